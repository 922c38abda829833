"""Reading a cron expression: nicknames, the seconds field (cronsim has none), and error
messages that name the field at fault and what it accepts."""

from __future__ import annotations

import re
from datetime import datetime

from cronsim import CronSim, CronSimError

_NAIVE_EPOCH = datetime(1970, 1, 1)


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
