"""Pure schedule arithmetic: when does a trigger fire next?

No I/O and no asyncio. Every time is a float of seconds since the epoch (UTC). A trigger
answers one question, :meth:`Trigger.next_after`: the smallest fire time strictly greater
than a given instant, or ``None`` when it never fires again.

- :class:`Every` fires at ``anchor + k * interval`` for every integer ``k``, so runs never
  drift, however late each one starts.
- :class:`Cron` fires on a cron expression (5 fields, or 6 with seconds first, or a nickname
  such as ``@daily``) read on the wall clock of an IANA time zone.
- :class:`At` fires once.

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
import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

__all__ = ["At", "Cron", "Every", "Trigger", "stable_offset", "upcoming"]

_NAIVE_EPOCH = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)


@runtime_checkable
class Trigger(Protocol):
    """When a job fires: pure arithmetic on epoch seconds (UTC)."""

    def next_after(self, after: float) -> float | None:
        """The smallest fire time strictly greater than `after`, or None if it never fires again."""
        ...

    def describe(self) -> str:
        """A short human form, e.g. ``every 30s`` or ``cron '0 3 * * *' Europe/Berlin``."""
        ...


def upcoming(trigger: Trigger, after: float, n: int) -> list[float]:
    """The next `n` fire times after `after`, fewer if the trigger stops firing."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    times: list[float] = []
    while len(times) < n:
        fire = trigger.next_after(after)
        if fire is None:
            break
        times.append(fire)
        after = fire
    return times


def _format_seconds(seconds: float) -> str:
    # Same shape as the config's durations ("250ms", "30s", "1h30m"), so describe() reads back.
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    parts: list[str] = []
    rest = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    if rest or not parts:
        parts.append(f"{rest}s")
    return "".join(parts)


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat()


def stable_offset(name: str, interval: float) -> float:
    """A phase in ``[0, interval)`` derived from the job's name alone, in whole milliseconds
    (``offset = "auto"``): jobs with one interval spread out, and every host computes the same
    phase for the same name (a cryptographic hash, not Python's salted ``hash()``), as
    systemd's ``FixedRandomDelay=`` does per unit."""
    steps = math.floor(interval * 1000)
    if steps < 1:
        return 0.0
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % steps) / 1000


@dataclass(frozen=True, slots=True)
class Every(Trigger):
    """Fires at ``anchor + offset + k * interval`` for every integer ``k``: anchored, so never
    drifting. ``offset`` is the job's phase within the interval (``offset`` in the config)."""

    interval: float
    anchor: float = 0.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError(
                f"interval must be a finite number of seconds > 0, got {self.interval!r}"
            )
        if not math.isfinite(self.anchor):
            raise ValueError(f"anchor must be a finite epoch time, got {self.anchor!r}")
        if not (math.isfinite(self.offset) and 0 <= self.offset < self.interval):
            raise ValueError(
                f"offset must be at least 0 and less than the interval, got {self.offset!r}"
            )
        # Store floats so equal schedules compare and hash equal whether given as int or float.
        object.__setattr__(self, "interval", float(self.interval))
        object.__setattr__(self, "anchor", float(self.anchor))
        object.__setattr__(self, "offset", float(self.offset))

    @property
    def base(self) -> float:
        """The tick for k = 0: every tick is ``base + k * interval``. One float sum, the same
        on every host, so ticks with an offset are identical everywhere too."""
        return self.anchor + self.offset

    def next_after(self, after: float) -> float:
        interval = self.interval
        anchor = self.base
        k = math.floor((after - anchor) / interval) + 1
        fire = anchor + k * interval
        # The quotient can round across an integer, which would put k one off either way;
        # checking both neighbours catches that without a loop in the common case.
        if fire > after and anchor + (k - 1) * interval <= after:
            return fire
        return self._search(after, k)

    def _search(self, after: float, k: int) -> float:
        """Exact smallest tick above `after`, starting from a guess `k` that rounding spoiled.

        Ticks are non-decreasing in k, so gallop out to a bracket and bisect it. This also
        terminates when the interval is below float resolution at `after` (ticks collapse),
        where stepping k by one could take very long."""
        interval = self.interval
        anchor = self.base
        lo, hi = k - 1, k
        step = 1
        while anchor + hi * interval <= after:
            lo, hi, step = hi, hi + step, step * 2
        step = 1
        while anchor + lo * interval > after:
            lo, hi, step = lo - step, lo, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if anchor + mid * interval > after:
                hi = mid
            else:
                lo = mid
        return anchor + hi * interval

    def describe(self) -> str:
        text = f"every {_format_seconds(self.interval)}"
        if self.offset:
            text += f" offset {_format_seconds(self.offset)}"
        if self.anchor:
            text += f" from {_iso(self.anchor)}"
        return text


@dataclass(frozen=True, slots=True)
class At(Trigger):
    """Fires once, at `when`."""

    when: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.when):
            raise ValueError(f"when must be a finite epoch time, got {self.when!r}")
        object.__setattr__(self, "when", float(self.when))

    def next_after(self, after: float) -> float | None:
        return self.when if self.when > after else None

    def describe(self) -> str:
        return f"at {_iso(self.when)}"


# Debian cron's nicknames. cronsim 2.8 has none, and these are plain aliases, not syntax.
_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_ALLOWED = {
    "minute": "0-59",
    "hour": "0-23",
    "day-of-month": "1-31, L or LW",
    "month": "1-12 or JAN-DEC",
    "day-of-week": "0-7 or SUN-SAT (0 and 7 are Sunday), optionally with L or #1-#5",
}
_FIELD_FORMS = "forms: *, N, A-B, A,B,C, */N, A-B/N"
_SECONDS_TERM = re.compile(r"(\*|([0-9]+)(?:-([0-9]+))?)(?:/([0-9]+))?")


def _parse_seconds(field: str) -> tuple[int, ...]:
    """The sorted seconds (0-59) that a cron seconds field names."""
    seconds: set[int] = set()
    for term in field.split(","):
        match = _SECONDS_TERM.fullmatch(term)
        if match is None:
            raise ValueError(f"second field {field!r}: cannot read {term!r} ({_FIELD_FORMS})")
        star, first, last, step_text = match.groups()
        step = 1 if step_text is None else int(step_text)
        if step == 0:
            raise ValueError(f"second field {field!r}: the step in {term!r} must be at least 1")
        if star == "*":
            low, high = 0, 59
        else:
            low = int(first)
            # "N/S" means N-59/S, as cronsim reads it in the other fields.
            high = int(last) if last is not None else (59 if step_text is not None else low)
        if high > 59:
            raise ValueError(f"second field {field!r}: {term!r} is out of range (seconds are 0-59)")
        if low > high:
            raise ValueError(f"second field {field!r}: the range {term!r} runs backwards")
        seconds.update(range(low, high + 1, step))
    return tuple(sorted(seconds))


def _explain(error: CronSimError, fields: list[str]) -> str:
    """cronsim says only "Bad minute"; name the text at fault and what would be accepted."""
    text = str(error)
    for index, name in enumerate(_FIELDS):
        if text == f"Bad {name}":
            token = fields[index]
            if name == "day-of-month":
                try:
                    CronSim(f"0 0 {token} * *", _NAIVE_EPOCH)
                except CronSimError:
                    pass
                else:
                    return f"day-of-month {token!r} never occurs in month {fields[3]!r}"
            return f"bad {name} field {token!r} (allowed: {_ALLOWED[name]}; {_FIELD_FORMS})"
    return text


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
