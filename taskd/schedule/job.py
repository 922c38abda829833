"""ScheduledJob: the one asyncio Task that schedules one job.

It sleeps until the next tick (never waking it early, never spinning), decides what each due
tick becomes (a run, or a skip with a reason), and starts runs as child tasks so the overlap
policy can see them. Its cursor (the last tick handled) is persisted, so after downtime the
missed ticks are found and handled by ``catchup``:

- ``all``: every missed tick runs, oldest first (at most MAX_CATCHUP; older ones are skipped);
- ``latest``: the most recent due tick runs, earlier ones are skipped as ``coalesced`` (or
  ``missed`` if older than ``grace``);
- ``none``: the most recent due tick runs only if it is at most ``grace`` late; the rest are
  skipped as ``missed``.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from taskd.run.events import Cause, SkipReason
from taskd.run.runner import RunInfo, cancelled_before_start, execute
from taskd.schedule.skips import SkipSpan, skip
from taskd.schedule.timers import timers
from taskd.schedule.triggers import Every, Trigger

if TYPE_CHECKING:
    from taskd.jobspec import JobSpec
    from taskd.run.runtime import Runtime


log = structlog.get_logger("taskd.schedule")

MAX_CATCHUP = 1000  # catchup = "all" runs at most this many of the newest due ticks
MAX_STEPS = 10_000  # ticks stepped through per slice of a long backlog (non-every triggers)
CLOCK_BACK = 1.0  # a cursor this far in the future means the wall clock went back
QUEUE_LIMIT = 100  # overlap = "queue": ticks waiting behind a running run
# uvloop rounds timers to whole milliseconds and can fire up to ~1 ms early; aiming 1 ms past
# the tick makes an early wake-up (and the re-sleep it costs) rare.
TIMER_SLACK = 0.001


class ManualRun:
    """What a manual trigger waits on: ``started`` and ``ended`` are resolved with the run's
    RunInfo, or both with the SkipReason when it never runs (refused, or dropped from the
    queue)."""

    __slots__ = ("ended", "queued", "started")

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.queued = False  # waits behind a run in flight (overlap = "queue")
        self.started: asyncio.Future[RunInfo | SkipReason] = loop.create_future()
        self.ended: asyncio.Future[RunInfo | SkipReason] = loop.create_future()

    def begin(self, info: RunInfo | SkipReason) -> None:
        if not self.started.done():
            self.started.set_result(info)

    def end(self, value: RunInfo | SkipReason) -> None:
        for fut in (self.started, self.ended):
            if not fut.done():
                fut.set_result(value)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class ScheduledJob:
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
        self._timer: tuple[float, ScheduledJob] | None = None
        self._timer_at = 0.0
        # Resumed with ticks still due from the pause: those that do not run are skipped as
        # "paused", not "missed" or "coalesced".
        self._resumed = False
        # Skips not yet logged (see taskd.schedule.skips); None while the job is on time.
        self._skips: SkipSpan | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    # -- control, from the daemon --------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"taskd-job:{self.name}"
        )

    def update(self, spec: JobSpec) -> None:
        """A reload changed this job: the next tick follows the new definition; runs in
        flight finish under the old one (they hold their own spec)."""
        old, new = self.spec.config, spec.config
        self.spec = spec
        rescheduled = (old.schedule, old.every, old.offset, old.cron, old.at, old.timezone) != (
            new.schedule,
            new.every,
            new.offset,
            new.cron,
            new.at,
            new.timezone,
        )
        # A new schedule starts from now: the reload itself is not downtime to catch up on.
        # A paused job keeps its cursor: on resume its backlog is decided under the new
        # schedule, as after a restart with the changed config.
        if rescheduled and self.cursor is not None and not self.paused:
            self.cursor = max(self.cursor, time.time())
            if self.rt.store is not None:
                self.rt.store.set_tick(self.name, self.cursor)
        self._end_skips()
        self._rearm()
        self._poke()

    def remove(self) -> None:
        """Stop scheduling; a run in flight finishes. Queued ticks are dropped (as skips)."""
        self.removed = True
        self._drop_queue(SkipReason.REMOVED)
        self._end_skips()
        self._poke()

    def revive(self, spec: JobSpec) -> None:
        """A reload added back a job that was removed while its run was still going: this
        object takes the job again, so the overlap policy still sees that run. Its cursor
        stays: the ticks that came while it was removed are handled by ``catchup``, as for a
        job added back after its run ended."""
        self.removed = False
        self.spec = spec
        self._rearm()
        if self.task is None or self.task.done():
            self.start()
        else:
            self._poke()

    def stop(self) -> None:
        self._stopping = True
        self._drop_queue(SkipReason.SHUTDOWN)
        self._end_skips()  # nothing left unlogged after a clean stop
        self._poke()

    def set_paused(self, paused: bool) -> bool:
        """Pause or resume (persisted); False when it already was. While paused no tick is
        handled and the cursor stays put; on resume the ticks that came meanwhile are a
        backlog that ``catchup`` decides on, as after downtime, and those that do not run are
        skipped as ``paused``."""
        if paused == self.paused:
            return False
        self.paused = paused
        if self.rt.store is not None:
            self.rt.store.set_paused(self.name, paused)
        if paused:
            # Scheduled ticks queued behind a running run (overlap = "queue", a catch-up
            # backlog) do not run either; manual runs already asked for still do.
            manual = [entry for entry in self.queue if entry[1] is Cause.MANUAL]
            self.queue = [
                entry for entry in self.queue if entry[1] is not Cause.MANUAL
            ] or _NO_TICKS
            self._drop_queue(SkipReason.PAUSED)
            self.queue = manual or _NO_TICKS
            self._end_skips()
        else:
            self._resumed = True
            self._rearm()
        self._poke()
        return True

    def trigger_now(self, waiter: ManualRun | None = None) -> SkipReason | None:
        """A manual run now (``taskd trigger``), under the job's overlap policy. Returns the
        reason when it was refused; ``waiter`` is resolved when the run ends (its RunInfo)
        or its tick is skipped (the reason). The cursor does not move: no tick is used up."""
        now = time.time()
        reason = self._fire(now, now, Cause.MANUAL, waiter)
        if reason is None:
            self._poke()  # an inline run is started by the job's own task
        return reason

    def clock_changed(self) -> None:
        """The wall clock stepped: time the next tick anew (the timer counts loop time)."""
        self._rearm()
        self._poke()

    def cancel_runs(self, reason: str) -> None:
        for task, info in self.active.values():
            if info.cancel_reason is not None and not self._stopping:
                continue  # already being cancelled: a second cancel would not be absorbed
            info.cancel_reason = reason
            task.cancel()

    def _poke(self) -> None:
        """Wake the job's sleep to recompute it. The timer stays: the sleep that follows
        reuses it if its tick is still the next one."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(False)

    @property
    def done(self) -> bool:
        return (self._stopping or self.removed) and not self.active

    # -- the schedule loop -------------------------------------------------------------------

    @property
    def crashed(self) -> bool:
        """The job's task ended while the job is still meant to run (a bug, logged)."""
        return self.task is not None and self.task.done() and not (self._stopping or self.removed)

    async def _loop(self) -> None:
        # A bug here is caught, logged and ends this job's schedule only (the job shows as
        # crashed); it must not take the daemon or other jobs down. Handled here rather
        # than in a done callback: that callback and its context were 128 bytes per job.
        crashed = False
        try:
            loop_now = time.time
            now = loop_now()
            if self.spec.trigger is None and not (self._stopping or self.removed):
                # on = "startup": once, when the job's task starts (not again on a reload).
                self._fire(now, now)
                await self._drain()
            if self.cursor is None:
                self.cursor = now
            while not (self._stopping or self.removed):
                if self.queue and not self.active:
                    # Left over when a reload switched overlap between inline and task modes.
                    if self._inline:
                        await self._drain()
                    elif self._no_thread:
                        self._drop_queue(SkipReason.EXHAUSTED)
                    else:
                        self.start_run(*self._dequeue())
                    now = loop_now()
                    continue  # a stop or reload may have come while draining
                if self.cursor > now + CLOCK_BACK and self._clock_warned != self.cursor:
                    # The wall clock stepped back past ticks already handled. They are on
                    # record and must not run again, so the job waits until the clock passes
                    # its last tick; say so once.
                    self._clock_warned = self.cursor
                    log.warning(
                        "clock_went_back",
                        job=self.name,
                        last_tick=_utc(self.cursor).isoformat(),
                        waits=round(self.cursor - now, 3),
                        hint="ticks already run are not run again; check the host's clock",
                    )
                if self.paused:
                    # Nothing is handled and the cursor stays: see set_paused.
                    self.next_fire = None
                    await self._sleep(None)
                    now = loop_now()
                    continue
                spec = self.spec
                trigger = spec.trigger
                tick = None if trigger is None else trigger.next_after(self.cursor)
                if tick is None:
                    # on = "startup", or a one-shot that has fired: wait for a reload that
                    # gives it a schedule again, or for the stop.
                    self.next_fire = None
                    await self._sleep(None)
                    now = loop_now()
                    continue
                if tick > now:
                    self._resumed = False  # nothing left from the pause
                    jitter = spec.config.jitter
                    target = tick + (random.uniform(0, jitter) if jitter else 0.0)
                    self.next_fire = target
                    if not await self._sleep(target):
                        now = loop_now()
                        continue  # poked: reload, stop or clock step; recompute from the cursor
                    now = loop_now()
                    # Never before its time, whatever the timer did.
                    while now < target and not (self._stopping or self.removed):
                        await self._sleep(target)
                        now = loop_now()
                    if self._stopping or self.removed:
                        break  # a stop that came with the timer: this tick is not handled
                if self._handle_due(tick, now):
                    await asyncio.sleep(0)  # a long backlog is handled in slices
                await self._drain()
                now = loop_now()
        except Exception as exc:
            crashed = True
            log.error("scheduler_crashed", job=self.name, error=repr(exc), exc_info=exc)
        finally:
            self._disarm()
            if self._stopping:
                self._drop_queue(SkipReason.SHUTDOWN)
            elif self.removed:
                self._drop_queue(SkipReason.REMOVED)
            else:
                if not crashed:
                    log.error(
                        "scheduler_ended",
                        job=self.name,
                        hint="the job will not run again until a restart",
                    )
                # Inline runs queued for this task will never start: tell whoever waits.
                self._drop_queue(SkipReason.CRASHED)
            self._end_skips()

    def _due(
        self, trigger: Trigger, first: float, now: float
    ) -> tuple[list[float], int, float | None]:
        """The due ticks from ``first`` up to ``now``: the newest MAX_CATCHUP of them (oldest
        first) and how many there were in all. When stepping stopped short of ``now`` (a
        long non-``every`` backlog, done in slices), also the newest tick older than the kept
        ones: the slice ends there, and the kept ones are looked at again with the next."""
        if isinstance(trigger, Every):
            # O(1) however long the daemon was down: a month of every = "1s" is 2.6M ticks.
            interval, anchor = trigger.interval, trigger.base
            k0 = round((first - anchor) / interval)
            if anchor + (k0 + 1) * interval > now:
                return [anchor + k0 * interval], 1, None  # on time: just the tick woken for
            count = max(int((now - first) // interval) + 1, 1)
            # Floor division can be one off when now sits on a tick to within rounding: settle
            # the count on the ticks themselves, computed the way they are everywhere else.
            while anchor + (k0 + count) * interval <= now:
                count += 1
            while count > 1 and anchor + (k0 + count - 1) * interval > now:
                count -= 1
            ticks = [
                anchor + (k0 + i) * interval for i in range(max(count - MAX_CATCHUP, 0), count)
            ]
            return ticks, count, None
        kept: deque[float] = deque(maxlen=MAX_CATCHUP)
        tick: float | None = first
        count = 0
        evicted: float | None = None
        while tick is not None and tick <= now and count < MAX_STEPS:
            if len(kept) == MAX_CATCHUP:
                evicted = kept[0]
            kept.append(tick)
            count += 1
            tick = trigger.next_after(tick)
        more = tick is not None and tick <= now
        return list(kept), count, evicted if more else None

    def _handle_due(self, first: float, now: float) -> bool:
        """Turn the due ticks into runs and skips per catchup/grace. True when only a slice
        of a very long backlog was handled (the caller yields, then comes back for more)."""
        spec = self.spec
        trigger = spec.trigger
        assert trigger is not None
        cfg = spec.config
        ticks, count, slice_end = self._due(trigger, first, now)
        if slice_end is not None:
            # Not the newest ticks yet: skip the ones that cannot be among the newest
            # MAX_CATCHUP, and come back for the rest (the caller yields in between).
            self._skip_span(
                first,
                slice_end,
                count - len(ticks),
                SkipReason.PAUSED if self._resumed else SkipReason.MISSED,
            )
            self.cursor = slice_end
            if self.rt.store is not None:
                self.rt.store.set_tick(self.name, slice_end)
            return True
        resumed, self._resumed = self._resumed, False
        latest = ticks[-1]
        if cfg.catchup == "all":
            run = ticks
        elif cfg.catchup == "latest" or now - latest <= cfg.grace:
            run = [latest]
        else:
            run = []
        skipped = count - len(run)
        if skipped:
            # Of the skipped ticks, those older than grace are missed, the rest coalesced.
            # Ticks older than the ones kept are older still: missed.
            kept_skipped = ticks[: len(ticks) - len(run)]
            coalesced = [t for t in kept_skipped if now - t <= cfg.grace]
            missed = skipped - len(coalesced)
            if missed:
                last_missed = (
                    kept_skipped[len(kept_skipped) - len(coalesced) - 1]
                    if len(kept_skipped) > len(coalesced)
                    else first
                )
                self._skip_span(
                    first, last_missed, missed, SkipReason.PAUSED if resumed else SkipReason.MISSED
                )
            if coalesced:
                self._skip_span(
                    coalesced[0],
                    coalesced[-1],
                    len(coalesced),
                    SkipReason.PAUSED if resumed else SkipReason.COALESCED,
                )
        self.cursor = latest
        if self.rt.store is not None:
            self.rt.store.set_tick(self.name, latest)
        if run:
            grace = cfg.grace
            refused = self._fire(run[0], now, _cause(run[0], now, grace))
            rest = run[1:]
            if rest:
                # Catch-up ticks run one after another, oldest first, whatever ``overlap``
                # says: they are a backlog, not ticks that collided with a slow run.
                if refused is None:
                    for t in rest:
                        self._enqueue((t, _cause(t, now, grace), None))
                else:
                    self._skip_span(rest[0], rest[-1], len(rest), refused)
            if not skipped and refused is None and self._skips is not None and self._skips.idle():
                self._skips = None  # on time, and nothing to log: the next skip logs at once
        return False

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

    def __lt__(self, other: ScheduledJob) -> bool:
        # Only to break ties between equal deadlines in the timer heap: any fixed order does.
        return id(self) < id(other)

    def _on_timer(self) -> None:
        """The timer fired (taskd.schedule.timers, which has cleared it)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(True)
        elif self._running_inline:
            self._on_busy_tick()
        # Else the job's task is between steps: it looks at the time before it sleeps again.

    # -- starting runs -------------------------------------------------------------------

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
            await self._run_inline(tick, cause, waiter)

    async def _run_inline(self, tick: float, cause: Cause, waiter: ManualRun | None) -> None:
        rt = self.rt
        info = RunInfo(rt.new_run_id(), self.name, tick, time.time(), cause)
        if waiter is not None:
            waiter.begin(info)
        task = asyncio.current_task()
        assert task is not None
        self._add_run(info, task)
        self._arm_next()
        try:
            await execute(rt, self.spec, info)
        except asyncio.CancelledError:
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
            _settle(waiter, info)
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

    def _on_busy_tick(self) -> None:
        if self._stopping or self.removed or self.paused:
            return  # paused: resuming re-arms
        try:
            trigger = self.spec.trigger
            if trigger is None or self.cursor is None:
                return
            now = time.time()
            tick = trigger.next_after(self.cursor)
            if tick is not None and tick <= now:  # else the timer was early: re-arm
                self._handle_due(tick, now)
            self._arm_next()
        except Exception:
            log.exception("scheduler_crashed", job=self.name)

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
            execute(rt, self.spec, info), name=f"taskd-run:{self.name}:{info.run_id}"
        )
        self._add_run(info, task)
        if waiter is not None:
            waiter.begin(info)
        task.add_done_callback(functools.partial(self._run_done, info, self.spec, waiter))
        return info

    def _run_done(
        self,
        info: RunInfo,
        spec: JobSpec,
        waiter: ManualRun | None,
        task: asyncio.Task[RunInfo],
    ) -> None:
        run_id = info.run_id
        self._end_run(run_id)
        if info.outcome is None and task.cancelled():
            # Cancelled before its first step (overlap = "replace" in the same loop
            # iteration): execute never ran, so record the run here, or it would vanish.
            cancelled_before_start(self.rt, spec, info)
        _settle(waiter, info)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("run_crashed", job=self.name, run_id=run_id, error=repr(exc), exc_info=exc)
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

    def _drop_queue(self, reason: SkipReason) -> None:
        if self.queue:
            queue, self.queue = self.queue, _NO_TICKS
            ticks = [tick for tick, cause, _ in queue if cause is not Cause.MANUAL]
            if ticks:
                self._skip(ticks, reason)
            for _, _, waiter in queue:
                _settle(waiter, reason)


# Shared empty values, never written to: only _add_run and _enqueue add, to a fresh one.
_NO_RUNS: dict[str, tuple[asyncio.Task[Any], RunInfo]] = {}
_NO_TICKS: list[tuple[float, Cause, ManualRun | None]] = []


def _cause(tick: float, now: float, grace: float) -> Cause:
    """A tick run later than ``grace`` runs because of ``catchup``; others on schedule."""
    return Cause.CATCHUP if now - tick > grace else Cause.SCHEDULE


def _settle(waiter: ManualRun | None, value: RunInfo | SkipReason) -> None:
    if waiter is not None:
        waiter.end(value)
