"""JobState: the state of one scheduled job, with its timer and its span of skips.

ScheduledJob is built in layers on these slots, one module each: JobState (here) <- JobRuns
(taskd.schedule.runs: starting runs) <- JobCatchup (taskd.schedule.catchup: due ticks into
runs and skips) <- ScheduledJob (taskd.schedule.job: the loop and control). Every layer above
declares ``__slots__ = ()``, so a job is still one fixed layout with no ``__dict__``, and a
method is found through its type's attribute cache: the layers cost nothing per job or tick.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from taskd.schedule.skips import SkipSpan, skip
from taskd.schedule.timers import timers

if TYPE_CHECKING:
    from taskd.jobspec import JobSpec
    from taskd.ledger import Ledger
    from taskd.run.events import Cause, SkipReason
    from taskd.run.runner import RunInfo
    from taskd.run.runtime import Runtime
    from taskd.schedule.manual import ManualRun

# uvloop rounds timers to whole milliseconds and can fire up to ~1 ms early; aiming 1 ms past
# the tick makes an early wake-up (and the re-sleep it costs) rare.
TIMER_SLACK = 0.001


class JobState:
    __slots__ = (
        "_clock_warned",
        "_resumed",
        "_skips",
        "_stopping",
        "_timer",
        "_timer_at",
        "_wake",
        "active",
        "cursor",
        "ledger",
        "next_fire",
        "paused",
        "queue",
        "removed",
        "rt",
        "spec",
        "task",
    )

    def __init__(
        self, spec: JobSpec, rt: Runtime, *, cursor: float | None, paused: bool = False
    ) -> None:
        self.spec = spec
        self.rt = rt
        # Where this job's ticks and runs go on record, by its scope (and anew when a reload
        # changes it: ScheduledJob.update).
        self.ledger: Ledger = rt.ledgers[spec.config.scope]
        self.cursor = cursor  # last tick handled (run or skipped); None: never started
        self.paused = paused
        self.next_fire: float | None = None
        # Runs in flight: run id -> (the task running it, its info). An inline run's task is
        # this job's own task. While there are none it is the shared empty _NO_RUNS, never
        # written to (see _add_run): an idle job keeps no dict of its own (64 bytes).
        self.active: dict[str, tuple[asyncio.Task[Any], RunInfo]] = _NO_RUNS
        # (tick, cause, waiter) waiting to run; a list, not a deque (an empty deque costs 760
        # bytes). Nearly always empty, so it is the shared _NO_TICKS then (see _enqueue).
        self.queue: list[tuple[float, Cause, ManualRun | None]] = _NO_TICKS
        self._clock_warned: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.removed = False
        self._stopping = False
        self._wake: asyncio.Future[bool] | None = None
        # One timer per tick, at wall-clock _timer_at: it ends the job's sleep, or, when the
        # tick comes while the job's own task runs a run, handles the tick then. Armed once
        # when a run starts, it is the very timer the job sleeps on after the run.
        # The timer is an entry in the loop's one heap of job timers (taskd.schedule.timers).
        self._timer: tuple[float, JobState] | None = None
        self._timer_at = 0.0
        # Resumed with ticks still due from the pause: those that do not run are skipped as
        # "paused", not "missed" or "coalesced".
        self._resumed = False
        # Skips not yet logged (see taskd.schedule.skips); None while the job is on time.
        self._skips: SkipSpan | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def _poke(self) -> None:
        """Wake the job's sleep to recompute it. The timer stays: the sleep that follows
        reuses it if its tick is still the next one."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(False)

    @property
    def done(self) -> bool:
        return (self._stopping or self.removed) and not self.active

    @property
    def crashed(self) -> bool:
        """The job's task ended while the job is still meant to run (a bug, logged)."""
        return self.task is not None and self.task.done() and not (self._stopping or self.removed)

    def _skip(self, ticks: list[float], reason: SkipReason) -> None:
        self._skip_span(ticks[0], ticks[-1], len(ticks), reason)

    def _skip_span(self, first: float, last: float, count: int, reason: SkipReason) -> None:
        """Count ``count`` skipped ticks from ``first`` to ``last`` (one event, now) and log
        them, at once or with the job's span of skips (taskd.schedule.skips)."""
        self._skips = skip(self.rt, self.name, self._skips, reason, first, last, count)

    def _end_skips(self) -> None:
        """The job's span of skips is over: log what it added up."""
        if self._skips is not None:
            self._skips.report()
            self._skips = None

    def _sleep(self, when: float | None) -> asyncio.Future[bool]:
        """A future that turns True at wall-clock ``when`` (None: never) or False when poked.

        A plain future rather than a coroutine: one frame fewer per idle job."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._wake = fut
        if when is None:
            self._disarm()
        else:
            self._arm(when)
        return fut

    def _arm(self, when: float) -> None:
        """The timer, at wall-clock ``when`` (kept if it is already set for that time)."""
        heap = timers()
        if self._timer is not None:
            if self._timer_at == when:
                return
            self._timer = None
            heap.discard()
        self._timer_at = when
        delay = max(when - time.time(), 0.0) + TIMER_SLACK
        self._timer = heap.add(heap.now() + delay, self)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer = None
            timers().discard()

    def __lt__(self, other: JobState) -> bool:
        # Only to break ties between equal deadlines in the timer heap: any fixed order does.
        return id(self) < id(other)

    if TYPE_CHECKING:
        # What the timer does when it fires: ScheduledJob's (taskd.schedule.job).
        def _on_timer(self) -> None: ...


# Shared empty values, never written to: only _add_run and _enqueue add, to a fresh one.
_NO_RUNS: dict[str, tuple[asyncio.Task[Any], RunInfo]] = {}
_NO_TICKS: list[tuple[float, Cause, ManualRun | None]] = []
