"""Regressions of the fleet review (/work/notes/review-fleet.md, R1-R11), each against a real
PostgreSQL with real schedulers (the hosts of test_fleet_ledger): each test fails on the code
the review found the bug in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.dbservers import PgServer
from tests.fleetkit import fleet_config
from tests.unit.test_fleet_ledger import Host, _rows, _spec, _until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
async def fleet(
    postgres: PgServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[list[Host]]]]:
    made: list[Host] = []

    async def make(n: int, **kw: Any) -> list[Host]:
        kw.setdefault("lease", 3.0)
        kw.setdefault("sweep", 0.3)
        cfg = fleet_config(postgres, tmp_path, **kw)
        new = [Host(f"h{i + 1}", cfg, tmp_path) for i in range(n)]
        made.extend(new)
        return new

    yield make
    for h in made:
        await h.stop()


class TestFinishRefused:
    """R3: a finish the database refuses for its values is never taken as kept."""

    @pytest.mark.parametrize("bad", ["nan", "nul-result", "nul-error"])
    async def test_a_finish_with_values_jsonb_refuses_ends_the_tick_once(
        self, fleet: Any, events: list[dict[str, Any]], bad: str
    ) -> None:
        runs: list[int] = []

        async def func(ctx: Any) -> Any:
            runs.append(ctx.fence)
            if bad == "nan":
                return {"ratio": float("nan"), "n": 1}
            if bad == "nul-result":
                return {"text": "a\x00b"}
            raise ValueError("bad byte \x00 in input")

        h1, h2 = await fleet(2, max_takeovers=1)
        at = time.time() + 0.3
        for h in (h1, h2):
            await h.start(_spec(func, schedule="at", at=at, grace=30.0))

        async def ended() -> list[dict[str, Any]]:
            return [r for r in await _rows(h1) if r["state"] != "running"]

        deadline = time.monotonic() + 30
        while not await ended():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        (row,) = await _rows(h1)
        assert row["state"] == ("failed" if bad == "nul-error" else "succeeded")
        assert row["takeovers"] == 0 and len(runs) == 1  # ran once, never taken over
        if bad == "nan":
            assert row["result"] is not None and '"n": 1' in row["result"]
        await _until(lambda: not h1.fleet.held and not h2.fleet.held)
