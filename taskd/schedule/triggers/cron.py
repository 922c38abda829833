"""Cron: fires on a cron expression read on the wall clock of an IANA time zone.

Daylight saving time (``Cron`` only; also in docs/dst.md):

- A *fixed-time* expression, one whose minute and hour fields both start with something other
  than ``*`` (``30 2 * * *``, ``0 0-23 * * *``, ``@daily``), runs at most once per matching
  wall-clock time. A time that the spring-forward gap skips runs at the end of the gap (the
  first instant of the new offset, e.g. 03:00 CEST); skipped times collapse into that one run.
  A time that the fall-back repeats runs once, at its first occurrence (summer time).
- A *wildcard* expression, one whose minute or hour field starts with ``*`` (``*/15 * * * *``,
  ``0 * * * *``, ``@hourly``), runs at every real instant whose local wall-clock time matches:
  nothing for times in a gap, and twice (once per offset) for times that are repeated.

This is Debian cron's rule, as cronsim implements it, with two cronsim defects corrected:

- Started inside a repeated stretch, cronsim yields a fixed-time run that lies before its
  start (the first occurrence, already past). Such values are dropped, so the answer does not
  depend on where the walk started.
- For wildcard expressions cronsim moves from hour to hour in whole-hour UTC steps. Across a
  transition that is not a whole hour, or not on the hour, that lands part-way into a local
  hour and loses the runs before it: ``*/15 2 * * *`` in Australia/Lord_Howe loses 02:00 and
  02:15 on 2026-04-05, ``*/20 23 * * *`` loses 23:00 and 23:20 on 2026-10-04, and in
  Pacific/Chatham (which falls back at 03:45) ``*/15 2 * * *`` loses the second 02:45.
  Wildcard expressions are therefore walked here with cronsim on naive wall-clock time, one
  UTC offset at a time.

Seconds (the 6th field) are layered here on cronsim's minutes, so a 6-field expression follows
the same DST rule as its 5-field form; cronsim's own 6-field support skips DST handling.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

from taskd.schedule.triggers.base import Trigger
from taskd.schedule.triggers.cronparse import _NAIVE_EPOCH, _NICKNAMES, _explain, _parse_seconds

_SECOND = timedelta(seconds=1)


def _to_seconds(wall: datetime) -> int:
    """A naive datetime read as if it were UTC, in whole epoch seconds."""
    return (wall - _NAIVE_EPOCH) // _SECOND


def _offset(tz: ZoneInfo, instant: int) -> int:
    offset = datetime.fromtimestamp(instant, tz).utcoffset()
    assert offset is not None  # a ZoneInfo always knows its offset
    return offset // _SECOND


class Cron(Trigger):
    """Fires on a cron expression read on the wall clock of `tz`.

    5 fields (minute hour day-of-month month day-of-week), 6 fields with seconds first, or a
    nickname (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly). The DST rule
    is in the module docstring. Instances cache an iterator so that asking for the next time
    after the previous answer is cheap; they are therefore not safe to share between threads.
    """

    __slots__ = (
        "_cron5",
        "_expr",
        "_last_after",
        "_last_fire",
        "_minute",
        "_minutes",
        "_second_index",
        "_seconds",
        "_tz",
        "_wildcard",
    )

    _last_after: float | None
    _last_fire: float | None
    _minutes: Iterator[int] | None
    _minute: int
    _second_index: int

    def __init__(self, expr: str, tz: ZoneInfo) -> None:
        self._expr = " ".join(expr.split())
        self._tz = tz
        text = self._expr
        if text.startswith("@"):
            nickname = text.lower()
            if nickname == "@reboot":
                raise ValueError('@reboot is not a schedule; use on = "startup" instead')
            if nickname not in _NICKNAMES:
                raise ValueError(
                    f"unknown nickname {text!r}; known: {', '.join(_NICKNAMES)} "
                    '(and for "at start-up" use on = "startup")'
                )
            text = _NICKNAMES[nickname]
        fields = text.split()
        if len(fields) == 6:
            self._seconds = _parse_seconds(fields[0])
            fields = fields[1:]
        elif len(fields) == 5:
            self._seconds = (0,)
        else:
            raise ValueError(
                f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 with "
                f"seconds first, got {len(fields)}"
            )
        # cronsim always gets 5 fields: given 6 it would switch off its DST handling.
        self._cron5 = " ".join(fields)
        try:
            CronSim(self._cron5, _NAIVE_EPOCH)
        except CronSimError as exc:
            raise ValueError(_explain(exc, fields)) from None
        # The same test cronsim (and Debian cron) uses to pick the DST rule.
        self._wildcard = fields[0].startswith("*") or fields[1].startswith("*")
        self._reset()

    def _reset(self) -> None:
        # The cache: the last question and answer, and the minute stream positioned there.
        self._last_after = None
        self._last_fire = None
        self._minutes = None
        self._minute = 0
        self._second_index = 0

    @property
    def expr(self) -> str:
        """The expression as given (whitespace normalised)."""
        return self._expr

    @property
    def tz(self) -> ZoneInfo:
        """The zone whose wall clock the expression is read on."""
        return self._tz

    def __repr__(self) -> str:
        return f"Cron({self._expr!r}, {self._tz!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cron):
            return NotImplemented
        return (self._expr, self._tz) == (other._expr, other._tz)

    def __hash__(self) -> int:
        return hash((self._expr, self._tz))

    def describe(self) -> str:
        return f"cron '{self._expr}' {self._tz.key or self._tz}"

    def next_after(self, after: float) -> float | None:
        # The scheduler asks with its previous answer (advance the cached stream) or repeats
        # its previous question; both are O(1). Anything else starts a fresh stream.
        if after == self._last_after:
            return self._last_fire
        seconds = self._seconds
        minutes = self._minutes
        if minutes is not None and after == self._last_fire:
            index = self._second_index + 1
            minute: int | None = self._minute
            if index == len(seconds):
                minute, index = next(minutes, None), 0
        else:
            # A minute that starts 59 s or more before `after` has no second left after it.
            start = math.floor(after) - 59
            minutes = self._minute_stream(start)
            minute = next(minutes, None)
            index = 0
            if minute is not None and minute <= after:
                index = bisect.bisect_right(seconds, after - minute)
                if index == len(seconds):
                    minute, index = next(minutes, None), 0
        if minute is None:
            self._reset()
            return None
        fire = float(minute + seconds[index])
        self._minutes = minutes
        self._minute = minute
        self._second_index = index
        self._last_after = after
        self._last_fire = fire
        return fire

    def _minute_stream(self, start: int) -> Iterator[int]:
        """Epoch seconds of every matching minute at or after `start`, strictly increasing."""
        if self._wildcard:
            return self._wildcard_minutes(start)
        return self._fixed_minutes(start)

    def _fixed_minutes(self, start: int) -> Iterator[int]:
        # cronsim's own DST rule (naive wall clock, fold=0, gaps pushed forward) is the one
        # we want here. It may yield instants before its start when started inside a
        # repeated stretch (it answers with fold=0), so keep only what is new.
        last = start - 1
        try:
            for wall in CronSim(self._cron5, datetime.fromtimestamp(last, self._tz)):
                instant = int(wall.timestamp())
                if instant > last:
                    last = instant
                    yield instant
        except OverflowError:  # past year 9999: nothing more to yield
            return

    def _wildcard_minutes(self, start: int) -> Iterator[int]:
        # Walk naive wall-clock time with one UTC offset at a time. A candidate whose instant
        # has a different offset lies past a transition: find the transition and carry on
        # from it with the new offset. A candidate that keeps the offset is the next run: a
        # run in some stretch in between would have come earlier in wall-clock order and
        # been caught. (That fails only if two transitions were closer together than their
        # offset change; no zone in tzdata has such a pair since 1900.)
        tz = self._tz
        segment = start  # the latest instant known to have the offset in use
        try:
            while True:
                offset = _offset(tz, segment)
                naive_start = _NAIVE_EPOCH + timedelta(seconds=segment + offset - 1)
                for wall in CronSim(self._cron5, naive_start):
                    instant = _to_seconds(wall) - offset
                    if _offset(tz, instant) == offset:
                        segment = instant
                        yield instant
                        continue
                    segment = self._next_transition(segment, instant, offset)
                    break
                else:
                    return
        except OverflowError:  # past year 9999: nothing more to yield
            return

    def _next_transition(self, same: int, changed: int, offset: int) -> int:
        """The first second in (same, changed] whose offset is not `offset`."""
        while changed - same > 1:
            mid = (same + changed) // 2
            if _offset(self._tz, mid) == offset:
                same = mid
            else:
                changed = mid
        return changed
