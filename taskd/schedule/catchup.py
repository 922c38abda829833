"""JobCatchup: the due ticks, and what each becomes (a run, or a skip with its reason).

Called with the first due tick and the time. What is due and what each tick becomes are
pure functions (taskd.schedule.decide, table-tested); this shell applies the Decision: the
skips, the cursor and its record, the run and the backlog queued behind it (see
taskd.schedule.job for catchup and grace).
"""

from __future__ import annotations

from taskd.run.events import Cause
from taskd.schedule.decide import cause_of, decide, due_ticks, on_time
from taskd.schedule.runs import JobRuns
from taskd.schedule.triggers import Every


class JobCatchup(JobRuns):
    __slots__ = ()

    def _due_fast(self, first: float, now: float) -> tuple[float, Cause] | None:
        """For a job on the fused path (``spec.fast``): when handling the due tick ``first``
        is exactly one run started at once, and nothing else (no skip, nothing queued),
        move the cursor as :meth:`_handle_due` would and return the tick and its cause;
        else None, and nothing changed (the caller takes the general path)."""
        if self.active or self.queue or self.paused or self._stopping or self.removed:
            return None  # _fire would skip it, queue it, or leave it to the queue
        if self.ledger.may_refuse:
            return None  # its run must be claimed first, which the fused path cannot do
        spec = self.spec
        trigger = spec.trigger
        assert isinstance(trigger, Every)
        tick = on_time(trigger, first, now)
        if tick is None:
            return None  # more than one tick due: catchup decides
        cfg = spec.config
        cause = cause_of(tick, now, cfg.grace)
        if cause is Cause.CATCHUP and cfg.catchup == "none":
            return None  # skipped as missed
        self._resumed = False
        self.cursor = tick
        if self._skips is not None and self._skips.idle():
            self._skips = None  # on time, and nothing to log: the next skip logs at once
        return tick, cause

    def _handle_due(self, first: float, now: float) -> bool:
        """Turn the due ticks into runs and skips per catchup/grace. True when only a slice
        of a very long backlog was handled (the caller yields, then comes back for more)."""
        spec = self.spec
        trigger = spec.trigger
        assert trigger is not None
        cfg = spec.config
        d = decide(
            *due_ticks(trigger, first, now),
            first,
            now,
            catchup=cfg.catchup,
            grace=cfg.grace,
            resumed=self._resumed,
        )
        if not d.more:
            self._resumed = False
        if d.missed is not None:
            self._skip_span(*d.missed)
        if d.coalesced is not None:
            self._skip_span(*d.coalesced)
        self.cursor = d.cursor
        self.ledger.advance(self.name, d.cursor)
        if d.more or not d.run:
            return d.more
        (tick, cause), rest = d.run[0], d.run[1:]
        refused = self._fire(tick, now, cause)
        if rest:
            # Catch-up ticks run one after another, oldest first, whatever ``overlap``
            # says: they are a backlog, not ticks that collided with a slow run.
            if refused is None:
                for t, c in rest:
                    self._enqueue((t, c, None))
            else:
                self._skip_span(rest[0][0], rest[-1][0], len(rest), refused)
        skipped = d.missed is not None or d.coalesced is not None
        if not skipped and refused is None and self._skips is not None and self._skips.idle():
            self._skips = None  # on time, and nothing to log: the next skip logs at once
        return False
