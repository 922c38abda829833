"""JobRuns: how a job starts its runs.

A run starts inline, in the job's own task (overlap = "skip" or "queue": never two at once),
or as a child task of its own (overlap = "replace" or "allow"), so the overlap policy can see
and cancel it. Ticks that wait behind a run are queued here; a tick that cannot run is
skipped with its reason. A run its ledger refuses (a fleet job's tick claimed by another
host, say: taskd.ledger.NotClaimed) is no run either: its tick is skipped with the ledger's
reason, with no run line and no history row.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from taskd.ledger import CLAIMING, NotClaimed
from taskd.run.events import Cause, SkipReason
from taskd.run.runner import RunInfo, cancelled_before_start, execute
from taskd.schedule.jobstate import _NO_RUNS, _NO_TICKS, JobState

if TYPE_CHECKING:
    from taskd.jobspec import JobSpec
    from taskd.ledger import Ledger
    from taskd.schedule.manual import ManualRun

log = structlog.get_logger("taskd.schedule")

QUEUE_LIMIT = 100  # overlap = "queue": ticks waiting behind a running run


class JobRuns(JobState):
    __slots__ = ()

    def cancel_runs(self, reason: str) -> None:
        for task, info in self.active.values():
            if info.cancel_reason is not None and not self._stopping:
                continue  # already being cancelled: a second cancel would not be absorbed
            info.cancel_reason = reason
            task.cancel()

    def _fire(
        self,
        tick: float,
        now: float,
        cause: Cause = Cause.SCHEDULE,
        waiter: ManualRun | None = None,
    ) -> SkipReason | None:
        """Start (or queue) a run for ``tick``; the reason if it was skipped instead."""
        spec = self.spec
        reason: SkipReason | None = None
        if self._stopping:
            reason = SkipReason.SHUTDOWN
        elif self.crashed and self._inline:
            reason = SkipReason.CRASHED  # no task left to run it
        elif self.removed:
            reason = SkipReason.REMOVED
        elif spec.broken is not None:
            reason = SkipReason.BROKEN
        elif self.paused and cause is not Cause.MANUAL:
            reason = SkipReason.PAUSED
        elif self._no_thread:
            reason = SkipReason.EXHAUSTED  # refused now, not queued behind stuck threads
        elif self.active or self.queue:
            overlap = spec.config.overlap
            if overlap == "skip":
                reason = SkipReason.OVERLAP
            elif overlap == "queue":
                if len(self.queue) >= QUEUE_LIMIT:
                    reason = SkipReason.QUEUE_FULL
                else:
                    self._enqueue((tick, cause, waiter))
                    if waiter is not None:
                        waiter.queued = True
                    return None
            elif overlap == "replace":
                self._drop_queue(SkipReason.REPLACED)
                self.cancel_runs("replaced by a newer run")
        if reason is not None:
            if cause is Cause.MANUAL:
                # A refused manual run is no tick of the schedule: the caller reports it.
                log.info("trigger_refused", job=self.name, reason=str(reason))
            else:
                self._skip([tick], reason)
            _settle(waiter, reason)
            return reason
        if self._inline:
            # Run it in this job's own task (see _drain): no task to create, no loop
            # iteration lost before the job starts.
            self._enqueue((tick, cause, waiter))
        else:
            self.start_run(tick, cause, waiter)
        return None

    @property
    def _no_thread(self) -> bool:
        """A blocking run could get no thread: every one the pool may have is stuck."""
        jt = self.spec.jobtype
        return jt is not None and jt.kind == "blocking" and self.rt.threads.exhausted

    @property
    def _inline(self) -> bool:
        """skip and queue never run two at once, so the job's own task can run each run
        itself; replace and allow need a task per run."""
        return self.spec.config.overlap in ("skip", "queue")

    async def _drain(self) -> None:
        """Run the queued ticks one after another in this task (inline mode)."""
        while (
            self.queue and self._inline and not self.active and not (self._stopping or self.removed)
        ):
            if self._no_thread:
                # The pool was exhausted after these ticks were queued: they cannot start.
                self._drop_queue(SkipReason.EXHAUSTED)
                break
            tick, cause, waiter = self._dequeue()
            rt = self.rt
            info = RunInfo(rt.new_run_id(), self.name, tick, time.time(), cause)
            if waiter is not None:
                waiter.begin(info)
            await self._run_inline(info, execute(rt, self.spec, info, self.ledger), waiter)

    def _start_fast(self, tick: float, cause: Cause) -> RunInfo:
        """The fused path's run for ``tick`` (see _due_fast, which moved the cursor): its
        tick and start on record in one journal write, before the job's code runs (the
        caller awaits ``execute_fast`` in this same task step)."""
        rt = self.rt
        name = self.spec.config.name
        info = RunInfo(rt.new_run_id(), name, tick, time.time(), cause)
        self.ledger.advance_and_open(name, tick, info)
        return info

    async def _run_inline(
        self, info: RunInfo, run: Coroutine[Any, Any, RunInfo], waiter: ManualRun | None
    ) -> None:
        """Await ``run`` (the run of ``info``) in this job's own task."""
        task = asyncio.current_task()
        assert task is not None
        self._add_run(info, task)
        self._arm_next()
        refused: SkipReason | None = None
        try:
            await run
        except NotClaimed as exc:
            refused = self._not_claimed(info, exc.reason, exc.detail, exc.holder)
        except asyncio.CancelledError:
            if info.claim is CLAIMING:
                # Cancelled while its ledger was asked: never opened, so no run: a skip.
                refused = self._not_claimed(info, self._cancelled_why())
            # An inline run's task is this job's own: a cancel meant for the run alone
            # (overlap switched to "replace" by a reload) must not end the job's schedule.
            if info.cancel_reason is None or self._stopping:
                raise
        except Exception as exc:  # execute records the job's own errors; this is our bug
            log.error(
                "run_crashed", job=self.name, run_id=info.run_id, error=repr(exc), exc_info=exc
            )
        finally:
            self._end_run(info.run_id)
            # The timer stays: the job sleeps on it next if no run or reload came meanwhile.
            _settle(waiter, info if refused is None else refused)
            if not self._stopping:
                # Whatever cancels were aimed at the run (also one the job caught and
                # swallowed) are spent: none may linger to end this task later.
                while task.cancelling():
                    task.uncancel()

    @property
    def _running_inline(self) -> bool:
        """This job's own task is running a run (overlap = "skip" or "queue")."""
        return any(task is self.task for task, _ in self.active.values())

    def _rearm(self) -> None:
        """A reload, resume or clock step touched the job: time its next tick anew."""
        self._disarm()
        if self._running_inline:
            self._arm_next()

    def _arm_next(self) -> None:
        """While this task is busy running, the timer handles the ticks that come meanwhile
        (skipped or queued, per ``overlap``), each at its own time."""
        trigger = self.spec.trigger
        if trigger is None or self.cursor is None:
            return
        tick = trigger.next_after(self.cursor)
        if tick is not None:
            self._arm(tick)

    def _add_run(self, info: RunInfo, task: asyncio.Task[Any]) -> None:
        if self.active is _NO_RUNS:
            self.active = {}
        self.active[info.run_id] = (task, info)

    def _end_run(self, run_id: str) -> None:
        self.active.pop(run_id, None)
        if not self.active:
            self.active = _NO_RUNS

    def _enqueue(self, entry: tuple[float, Cause, ManualRun | None]) -> None:
        if self.queue is _NO_TICKS:
            self.queue = []
        self.queue.append(entry)

    def _dequeue(self) -> tuple[float, Cause, ManualRun | None]:
        entry = self.queue.pop(0)
        if not self.queue:
            self.queue = _NO_TICKS
        return entry

    def start_run(
        self, tick: float, cause: Cause = Cause.SCHEDULE, waiter: ManualRun | None = None
    ) -> RunInfo:
        rt = self.rt
        info = RunInfo(rt.new_run_id(), self.name, tick, time.time(), cause)
        task = asyncio.get_running_loop().create_task(
            execute(rt, self.spec, info, self.ledger), name=f"taskd-run:{self.name}:{info.run_id}"
        )
        self._add_run(info, task)
        if waiter is not None:
            waiter.begin(info)
        # The spec and ledger the run started with: a run in flight ends under them.
        done = functools.partial(self._run_done, info, self.spec, self.ledger, waiter)
        task.add_done_callback(done)
        return info

    def _run_done(
        self,
        info: RunInfo,
        spec: JobSpec,
        ledger: Ledger,
        waiter: ManualRun | None,
        task: asyncio.Task[RunInfo],
    ) -> None:
        run_id = info.run_id
        self._end_run(run_id)
        refused: SkipReason | None = None
        crash: BaseException | None = None
        if task.cancelled():
            # Cancelled before its first step (overlap = "replace" in the same loop
            # iteration): execute never ran, so record the run here, or it would vanish;
            # unless its ledger never granted it (then it is a skip).
            if info.outcome is None and not cancelled_before_start(self.rt, spec, info, ledger):
                refused = self._not_claimed(info, self._cancelled_why())
        else:
            crash = task.exception()
            if isinstance(crash, NotClaimed):
                refused = self._not_claimed(info, crash.reason, crash.detail, crash.holder)
                crash = None
        _settle(waiter, info if refused is None else refused)
        if crash is not None:
            log.error(
                "run_crashed", job=self.name, run_id=run_id, error=repr(crash), exc_info=crash
            )
        if (
            self.queue
            and not self.active
            and not self._inline
            and not (self._stopping or self.removed)
        ):
            if self._no_thread:
                self._drop_queue(SkipReason.EXHAUSTED)
            else:
                self.start_run(*self._dequeue())
        if self.done or (self.queue and self._inline):
            self._poke()

    def _not_claimed(
        self, info: RunInfo, reason: SkipReason, detail: str = "", holder: str | None = None
    ) -> SkipReason:
        """The ledger did not grant the run of ``info``: its tick is skipped with ``reason``
        (a manual run is no tick: its caller is answered). Returns the reason."""
        log.debug(
            "not_claimed",
            job=self.name,
            run_id=info.run_id,
            reason=str(reason),
            detail=detail,
            holder=holder,
        )
        if info.cause is Cause.MANUAL:
            log.info("trigger_refused", job=self.name, reason=str(reason))
        else:
            self._skip([info.scheduled], reason)
        return reason

    def _cancelled_why(self) -> SkipReason:
        """Why a run cancelled before its ledger granted it did not run."""
        if self._stopping:
            return SkipReason.SHUTDOWN
        return SkipReason.REMOVED if self.removed else SkipReason.REPLACED

    def _drop_queue(self, reason: SkipReason) -> None:
        if self.queue:
            queue, self.queue = self.queue, _NO_TICKS
            ticks = [tick for tick, cause, _ in queue if cause is not Cause.MANUAL]
            if ticks:
                self._skip(ticks, reason)
            for _, _, waiter in queue:
                _settle(waiter, reason)


def _settle(waiter: ManualRun | None, value: RunInfo | SkipReason) -> None:
    if waiter is not None:
        waiter.end(value)
