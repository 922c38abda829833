"""JobCatchup: the due ticks, and what each becomes (a run, or a skip with its reason).

Called with the first due tick and the time; finds every tick due up to then (O(1) for
``every``, stepped in slices for other triggers) and applies ``catchup`` and ``grace`` (see
taskd.schedule.job).
"""

from __future__ import annotations

from collections import deque

from taskd.run.events import Cause, SkipReason
from taskd.schedule.runs import JobRuns
from taskd.schedule.triggers import Every, Trigger

MAX_CATCHUP = 1000  # catchup = "all" runs at most this many of the newest due ticks
MAX_STEPS = 10_000  # ticks stepped through per slice of a long backlog (non-every triggers)


class JobCatchup(JobRuns):
    __slots__ = ()

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

    def _due_fast(self, first: float, now: float) -> tuple[float, Cause] | None:
        """For a job on the fused path (``spec.fast``): when handling the due tick ``first``
        is exactly one run started at once, and nothing else (no skip, nothing queued),
        move the cursor as :meth:`_handle_due` would and return the tick and its cause;
        else None, and nothing changed (the caller takes the general path)."""
        if self.active or self.queue or self.paused or self._stopping or self.removed:
            return None  # _fire would skip it, queue it, or leave it to the queue
        spec = self.spec
        trigger = spec.trigger
        assert isinstance(trigger, Every)
        # The single-tick case of _due, computed the same way.
        interval, anchor = trigger.interval, trigger.base
        k0 = round((first - anchor) / interval)
        if anchor + (k0 + 1) * interval <= now:
            return None  # more than one tick due: catchup decides
        tick = anchor + k0 * interval
        cfg = spec.config
        late = now - tick
        if late > cfg.grace and cfg.catchup == "none":
            return None  # skipped as missed
        self._resumed = False
        self.cursor = tick
        if self._skips is not None and self._skips.idle():
            self._skips = None  # on time, and nothing to log: the next skip logs at once
        return tick, Cause.CATCHUP if late > cfg.grace else Cause.SCHEDULE

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


def _cause(tick: float, now: float, grace: float) -> Cause:
    """A tick run later than ``grace`` runs because of ``catchup``; others on schedule."""
    return Cause.CATCHUP if now - tick > grace else Cause.SCHEDULE
