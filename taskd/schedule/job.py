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
import random
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from taskd.run.events import Cause, SkipReason
from taskd.run.runner import execute_fast
from taskd.schedule.catchup import JobCatchup
from taskd.schedule.decide import decide, due_ticks
from taskd.schedule.jobstate import _NO_TICKS

if TYPE_CHECKING:
    from taskd.jobspec import JobSpec
    from taskd.schedule.manual import ManualRun


log = structlog.get_logger("taskd.schedule")

CLOCK_BACK = 1.0  # a cursor this far in the future means the wall clock went back


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class ScheduledJob(JobCatchup):
    """The one asyncio Task that schedules one job (its layers: taskd.schedule.jobstate)."""

    __slots__ = ()

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
        if old.scope != new.scope:
            # From the next tick on; a run in flight ends with the ledger it started with.
            self.ledger = self.rt.ledgers[new.scope]
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
            self.ledger.advance(self.name, self.cursor)
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
        self.ledger.set_paused(self.name, paused)
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

    def take_over(self, tick: float) -> SkipReason | None:
        """Run ``tick`` here now: a fleet job's tick whose owner lost its lease, which this
        host's ledger has claimed already (its sweep). Bypasses the local overlap check (the
        fleet checked it when the tick was first claimed) but not a pause, a stop, a removal
        or a broken job: then the reason, and the caller gives the claim back."""
        reason: SkipReason | None = None
        if self._stopping:
            reason = SkipReason.SHUTDOWN
        elif self.removed:
            reason = SkipReason.REMOVED
        elif self.spec.broken is not None:
            reason = SkipReason.BROKEN
        elif self.paused:
            reason = SkipReason.PAUSED
        elif self._no_thread:
            reason = SkipReason.EXHAUSTED
        if reason is None:
            self.start_run(tick, Cause.TAKEOVER)
        return reason

    def cancel_run(self, run_id: str, reason: str) -> bool:
        """Cancel one run in flight (a fleet run whose claim was lost); False if it is not
        running (any more)."""
        entry = self.active.get(run_id)
        if entry is None:
            return False
        task, info = entry
        if info.cancel_reason is None:
            info.cancel_reason = reason
            task.cancel()
        return True

    def catch_up(self, first: float, last: float) -> None:
        """Run what ``catchup`` picks of the ticks ``first``..``last``, which were handled
        already (skipped: a fleet job's ticks while the fleet database was down), as after
        downtime. They were counted as skips when skipped: the ones not picked now are not
        counted again. The cursor does not move."""
        trigger = self.spec.trigger
        if trigger is None or self._stopping or self.removed or self.paused:
            return
        cfg = self.spec.config
        now = time.time()
        d = decide(*due_ticks(trigger, first, now), first, now, catchup=cfg.catchup,
                   grace=cfg.grace, resumed=False)  # fmt: skip
        run = [(t, c) for t, c in d.run if t <= last]
        if not run:
            return  # the newest tick picked is after the outage: the schedule runs it
        (tick, cause), rest = run[0], run[1:]
        if self._fire(tick, now, cause) is None:
            for t, c in rest:
                self._enqueue((t, c, None))
        self._poke()

    def clock_changed(self) -> None:
        """The wall clock stepped: time the next tick anew (the timer counts loop time)."""
        self._rearm()
        self._poke()

    # -- the schedule loop -------------------------------------------------------------------

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
                spec = self.spec  # a reload may have come with the timer
                due = self._due_fast(tick, now) if spec.fast else None
                if due is not None:
                    # The common run, fused (JobSpec.fast): what _handle_due, _fire and
                    # _drain would do for it, with fewer steps.
                    info = self._start_fast(*due)
                    await self._run_inline(
                        info, execute_fast(self.rt, spec, info, self.ledger), None
                    )
                    if self.queue:
                        await self._drain()  # ticks queued during the run (overlap "queue")
                else:
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

    def _on_timer(self) -> None:
        """The timer fired (taskd.schedule.timers, which has cleared it)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(True)
        elif self._running_inline:
            self._on_busy_tick()
        # Else the job's task is between steps: it looks at the time before it sleeps again.

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
