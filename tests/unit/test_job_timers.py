"""taskd.schedule.timers: one loop timer for every job's next tick."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.testing import capture_logs

from taskd.schedule.timers import Timers


class FakeJob:
    """What Timers needs of a ScheduledJob: its live entry, a name and the callback."""

    def __init__(self, name: str, fired: list[str], fail: bool = False) -> None:
        self.name = name
        self._timer: Any = None
        self.fired = fired
        self.fail = fail

    def __lt__(self, other: FakeJob) -> bool:
        return id(self) < id(other)

    def _on_timer(self) -> None:
        self.fired.append(self.name)
        if self.fail:
            raise RuntimeError("a bug in one job")


class TestTimers:
    """Deadlines in order, given-up entries never fire, one job's bug stops no other."""

    async def test_fires_in_deadline_order_once_each(self) -> None:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        fired: list[str] = []
        now = loop.time()
        for name, delay in (("c", 0.06), ("a", 0.02), ("b", 0.04), ("a2", 0.02)):
            job = FakeJob(name, fired)
            job._timer = timers.add(now + delay, job)
        await asyncio.sleep(0.12)
        assert sorted(fired[:2]) == ["a", "a2"] and fired[2:] == ["b", "c"]

    async def test_a_given_up_entry_never_fires_and_is_compacted(self) -> None:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        fired: list[str] = []
        jobs = [FakeJob(f"j{i}", fired) for i in range(200)]
        for job in jobs:
            job._timer = timers.add(loop.time() + 60, job)
        for job in jobs[:150]:  # re-timed: the old entries are stale
            job._timer = None
            timers.discard()
        assert len(timers._heap) < 150  # rebuilt once stale entries outnumbered live ones
        keep = jobs[150]
        keep._timer = timers.add(loop.time() + 0.02, keep)
        timers.discard()  # its 60 s entry is given up too
        await asyncio.sleep(0.06)
        assert fired == ["j150"]

    async def test_one_job_s_bug_does_not_stop_the_others(self) -> None:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        fired: list[str] = []
        bad, good = FakeJob("bad", fired, fail=True), FakeJob("good", fired)
        with capture_logs() as logs:
            bad._timer = timers.add(loop.time() + 0.01, bad)
            good._timer = timers.add(loop.time() + 0.01, good)
            later = FakeJob("later", fired)
            later._timer = timers.add(loop.time() + 0.03, later)
            await asyncio.sleep(0.08)
        assert sorted(fired) == ["bad", "good", "later"]
        assert [e["job"] for e in logs if e["event"] == "scheduler_crashed"] == ["bad"]
