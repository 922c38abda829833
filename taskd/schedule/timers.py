"""One loop timer for every job's next tick.

Each job still has its own Task (it sleeps on a future of its own), but the time it waits
for sits in one heap here instead of a loop TimerHandle per job: under uvloop a TimerHandle
costs about 600 bytes in 6 allocations, a heap entry (a 2-tuple and its float) about 100,
so 10,000 idle jobs keep ~5 MB less. One loop timer is armed for the earliest entry.

An entry is ``(deadline, job)``, deadline in loop time. A job knows its live entry; one it
gave up (re-timed, disarmed) stays in the heap, stale, until its deadline passes or stale
entries outnumber live ones (then the heap is rebuilt), so a cancel costs nothing."""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from taskd.schedule.jobstate import JobState

    Entry = tuple[float, JobState]

log = structlog.get_logger("taskd.schedule")

# Loop timers can fire up to this much before their time (uvloop rounds to milliseconds); an
# entry this close is due. Jobs aim 1 ms past their tick and never start a run early anyway.
EARLY = 0.0005


class Timers:
    __slots__ = ("_at", "_handle", "_heap", "_loop", "_stale", "beat")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[Entry] = []
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the loop timer fires
        self._stale = 0
        # Told how late the loop timer fired, each time (LoopWatch.beat): a loop-lag sample
        # from a timer that fires anyway, and the sign that the loop has work again.
        self.beat: Callable[[float], None] | None = None

    def add(self, deadline: float, job: JobState) -> Entry:
        """Call ``job._on_timer()`` at loop time ``deadline`` unless ``job._timer`` is no
        longer the returned entry by then."""
        entry = (deadline, job)
        heapq.heappush(self._heap, entry)
        if deadline < self._at:
            self._set(deadline)
        return entry

    def now(self) -> float:
        return self._loop.time()

    def discard(self) -> None:
        """A job gave up its entry (it set ``job._timer`` to something else)."""
        self._stale += 1
        if self._stale > 64 and self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[1]._timer is e]
            heapq.heapify(self._heap)
            self._stale = 0

    def _set(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = deadline
        self._handle = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        now = self._loop.time()
        if self.beat is not None:
            self.beat(now - self._at)
        self._handle = None
        self._at = math.inf
        heap = self._heap
        limit = now + EARLY
        while heap and heap[0][0] <= limit:
            entry = heapq.heappop(heap)
            job = entry[1]
            if job._timer is not entry:
                self._stale = max(self._stale - 1, 0)
                continue
            job._timer = None
            try:
                job._on_timer()
            except Exception:  # one job's bug must not stop the others' timers
                log.exception("scheduler_crashed", job=job.name)
        if heap:
            self._set(heap[0][0])


_current: Timers | None = None


def timers() -> Timers:
    """The running loop's Timers."""
    global _current
    loop = asyncio.get_running_loop()
    if _current is None or _current._loop is not loop:
        _current = Timers(loop)
    return _current
