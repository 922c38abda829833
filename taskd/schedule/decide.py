"""Catch-up and grace as pure functions: which due ticks run, which are skipped and why.

No I/O, no asyncio and no job state: :func:`due_ticks` finds the ticks due from a job's first
unhandled tick up to now, and :func:`decide` turns them into a :class:`Decision` per the job's
``catchup`` and ``grace`` (README, "Catch-up, grace, overlap"). The scheduling Task
(taskd.schedule.catchup) applies the Decision: it starts or queues the runs, counts the
skips and moves the cursor. Keeping the arithmetic here lets it be table-tested on its own,
as the triggers are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from taskd.config.model import Catchup
from taskd.run.events import Cause, SkipReason
from taskd.schedule.triggers import Every, Trigger

MAX_CATCHUP = 1000  # catchup = "all" runs at most this many of the newest due ticks
MAX_STEPS = 10_000  # ticks stepped through per slice of a long backlog (non-every triggers)


# Skipped ticks: (first, last, count, reason), the arguments of the job's ``_skip_span`` in
# that order. A plain tuple: a NamedTuple's ``count`` field would shadow ``tuple.count``.
Span = tuple[float, float, int, SkipReason]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with the due ticks: the caller applies it and decides nothing itself."""

    run: tuple[tuple[float, Cause], ...]  # ticks to run, oldest first, each with its cause
    missed: Span | None  # ticks later than grace (MISSED, or PAUSED just after a resume)
    coalesced: Span | None  # ticks within grace folded into a newer one (or PAUSED)
    cursor: float  # the newest tick handled: the job's new cursor
    more: bool  # only a slice of a long backlog: yield, then come back for the rest


def due_ticks(trigger: Trigger, first: float, now: float) -> tuple[list[float], int, float | None]:
    """The due ticks from ``first`` up to ``now``: the newest MAX_CATCHUP of them (oldest
    first) and how many there were in all. When stepping stopped short of ``now`` (a
    long non-``every`` backlog, done in slices), also the newest tick older than the kept
    ones: the slice ends there, and the kept ones are looked at again with the next."""
    if isinstance(trigger, Every):
        single = on_time(trigger, first, now)
        if single is not None:
            return [single], 1, None  # on time: just the tick woken for
        # O(1) however long the daemon was down: a month of every = "1s" is 2.6M ticks.
        interval, anchor = trigger.interval, trigger.base
        k0 = round((first - anchor) / interval)
        count = max(int((now - first) // interval) + 1, 1)
        # Floor division can be one off when now sits on a tick to within rounding: settle
        # the count on the ticks themselves, computed the way they are everywhere else.
        while anchor + (k0 + count) * interval <= now:
            count += 1
        while count > 1 and anchor + (k0 + count - 1) * interval > now:
            count -= 1
        ticks = [anchor + (k0 + i) * interval for i in range(max(count - MAX_CATCHUP, 0), count)]
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


def on_time(trigger: Every, first: float, now: float) -> float | None:
    """The tick ``first`` stands for, when it is the only one due by ``now`` (the usual
    wake-up, and the scheduler's fused path); None when more are due."""
    interval, anchor = trigger.interval, trigger.base
    k0 = round((first - anchor) / interval)
    if anchor + (k0 + 1) * interval > now:
        return anchor + k0 * interval
    return None


def decide(
    ticks: Sequence[float],
    count: int,
    slice_end: float | None,
    first: float,
    now: float,
    *,
    catchup: Catchup,
    grace: float,
    resumed: bool,
) -> Decision:
    """What becomes of the due ticks that :func:`due_ticks` returned for ``first`` and
    ``now``: ``catchup = "all"`` runs every kept tick, ``"latest"`` the newest, ``"none"``
    the newest only if it is at most ``grace`` late. Skipped ticks within ``grace`` are
    coalesced, older ones missed; ``resumed`` (the first handling after a resume) makes
    both PAUSED."""
    if slice_end is not None:
        # Not the newest ticks yet: skip the ones that cannot be among the newest
        # MAX_CATCHUP, and come back for the rest (the caller yields in between).
        reason = SkipReason.PAUSED if resumed else SkipReason.MISSED
        span = (first, slice_end, count - len(ticks), reason)
        return Decision(run=(), missed=span, coalesced=None, cursor=slice_end, more=True)
    latest = ticks[-1]
    if catchup == "all":
        run = ticks
    elif catchup == "latest" or now - latest <= grace:
        run = ticks[-1:]
    else:
        run = ticks[:0]
    skipped = count - len(run)
    missed_span: Span | None = None
    coalesced_span: Span | None = None
    if skipped:
        # Of the skipped ticks, those older than grace are missed, the rest coalesced.
        # Ticks older than the ones kept are older still: missed.
        kept_skipped = ticks[: len(ticks) - len(run)]
        coalesced = [t for t in kept_skipped if now - t <= grace]
        missed = skipped - len(coalesced)
        if missed:
            # Today's behaviour, fixed in a later commit: when no kept tick is missed (only
            # ticks older than the kept ones are), the span's last tick falls back to first.
            last_missed = (
                kept_skipped[len(kept_skipped) - len(coalesced) - 1]
                if len(kept_skipped) > len(coalesced)
                else first
            )
            reason = SkipReason.PAUSED if resumed else SkipReason.MISSED
            missed_span = (first, last_missed, missed, reason)
        if coalesced:
            reason = SkipReason.PAUSED if resumed else SkipReason.COALESCED
            coalesced_span = (coalesced[0], coalesced[-1], len(coalesced), reason)
    return Decision(
        run=tuple((t, cause_of(t, now, grace)) for t in run),
        missed=missed_span,
        coalesced=coalesced_span,
        cursor=latest,
        more=False,
    )


def cause_of(tick: float, now: float, grace: float) -> Cause:
    """A tick run later than ``grace`` runs because of ``catchup``; others on schedule."""
    return Cause.CATCHUP if now - tick > grace else Cause.SCHEDULE
