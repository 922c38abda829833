"""The Reloader's cycle: coalescing, and what waiters get when the daemon stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

from taskd.reload import Reloader, ReloadResult, load_all
from taskd.schedule.jobset import Diff

CONFIG = """
[daemon]
state_dir = "state"
runtime_dir = "run"
entry_points = false
"""


def reloader(tmp_path: Path) -> Reloader:
    path = tmp_path / "taskd.toml"
    path.write_text(CONFIG)
    return Reloader(path, load_all(path), lambda new: Diff())


class TestReloader:
    """Each request is answered; a stop answers the rest with a failed result."""

    async def test_requests_in_a_storm_are_each_answered(self, tmp_path: Path) -> None:
        r = reloader(tmp_path)
        futures = [r.request() for _ in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert all(isinstance(x, ReloadResult) and x.ok for x in results)

    async def test_close_answers_every_waiter(self, tmp_path: Path) -> None:
        r = reloader(tmp_path)
        first = r.request()  # taken by the reload about to run
        await asyncio.sleep(0)
        second = r.request()  # waits for the next one
        r.close()
        for fut in (first, second):
            result = await asyncio.wait_for(fut, 2)
            assert result.ok is False and result.errors == ("the daemon is stopping",)
        late = await r.request()
        assert late.ok is False
