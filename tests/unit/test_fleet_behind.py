"""A fleet host behind on its finishes, against a real PostgreSQL (the hosts of
test_fleet_ledger): it spends no round trip on a claim that must lose, and finishes queued
together are written in one statement, each with its own verdict."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.unit.test_fleet_ledger import _rows, _spec, _until, hosts, logs  # noqa: F401

pytestmark = pytest.mark.timeout(90)


class TestBehind:
    async def test_a_tick_behind_a_queued_finish_is_skipped_without_a_claim(
        self,
        hosts: Any,  # noqa: F811
        logs: list[dict[str, Any]],  # noqa: F811
    ) -> None:
        # The writer stalls on the first finish (a database slow to take it): the job's row
        # stays running, so every later tick of this overlap="skip" job could only be
        # refused as overlap by the database. They are skipped here, with no claim sent.
        runs: list[float] = []

        async def func(ctx: Any) -> None:
            runs.append(ctx.scheduled.timestamp())

        (h,) = await hosts(1)
        stalled = asyncio.Event()
        go = asyncio.Event()
        finish = h.fleet.db.finish

        async def slow_finish(*args: Any, **kw: Any) -> Any:
            stalled.set()
            await go.wait()
            return await finish(*args, **kw)

        h.fleet.db.finish = slow_finish  # type: ignore[method-assign]
        claims = 0
        claim = h.fleet.db.claim

        async def counted(*args: Any, **kw: Any) -> Any:
            nonlocal claims
            claims += 1
            return await claim(*args, **kw)

        h.fleet.db.claim = counted  # type: ignore[method-assign]
        await h.start(_spec(func, every=0.1, overlap="skip"))
        await asyncio.wait_for(stalled.wait(), 10)
        skipped = [e for e in logs if e["event"] == "not_claimed"]
        await _until(
            lambda: len([e for e in logs if e["event"] == "not_claimed"]) >= len(skipped) + 5
        )
        behind = [e for e in logs if e["event"] == "not_claimed"][len(skipped) :]
        assert {e["reason"] for e in behind} == {"overlap"}
        assert all("not written yet" in e["detail"] for e in behind)
        assert claims == 1 and len(runs) == 1  # the one run; no claim sent since
        go.set()
        await _until(lambda: len(runs) >= 3)  # written: claims go out again
        await h.halt()
        assert claims >= 3
        rows = await _rows(h)
        assert [r["state"] for r in rows] == ["succeeded"] * len(rows)
        assert len(rows) == len(runs)
