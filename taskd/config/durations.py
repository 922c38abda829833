"""Durations ("250ms", "30s", "1h30m", 90) and sizes ("512MiB") as the config writes them."""

from __future__ import annotations

import functools
import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_ORDER = ("ms", "s", "m", "h", "d", "w")
MAX_DURATION = 100 * 365 * 86400.0  # beyond this, datetime arithmetic overflows
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|[KMGT]|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    # systemd's MemoryMax= style: "512M" means MiB
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string of number+unit parts ("1h30m", "250ms").

    Raises ValueError with a message fit for a config error."""
    if isinstance(value, str):
        return _parse_text(value)
    return _parse(value)


@functools.lru_cache(maxsize=1024)
def _parse_text(value: str) -> float:
    # The same text gives the very same float: 10,000 jobs `every = "1h"` then keep one float
    # between them, not one each (24 bytes a job, for the daemon's lifetime). Errors are
    # raised anew each time (lru_cache keeps only results).
    return _parse(value)


def _parse(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f'expected a duration like "30s" or a number of seconds, got {value!r}')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if not text:
            raise ValueError('empty duration; write e.g. "30s", "5m" or "1h30m"')
        pos, seconds = 0, 0.0
        last_rank = len(_ORDER)
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            rank = _ORDER.index(match.group(2))
            if rank >= last_rank:  # "1m1h", "1h1h": almost certainly a typo
                raise ValueError(
                    f'cannot read {value!r} as a duration: units must go from largest to smallest, each once (e.g. "1h30m")'
                )
            last_rank = rank
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text):
            raise ValueError(
                f'cannot read {value!r} as a duration; write e.g. "250ms", "30s", "5m", '
                f'"1h30m", "2d" or a number of seconds'
            )
    else:
        raise ValueError(
            f'expected a duration like "30s" or a number of seconds, got {type(value).__name__}'
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number >= 0, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is more than 100 years; is that what you meant?")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest readable form: 0.25 -> "250ms", 5400 -> "1h30m"."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    parts: list[str] = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            count = int(rest // size)
            parts.append(f"{count}{unit}")
            rest -= count * size
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)


def parse_offset(value: object, name: str, interval: float) -> float:
    """``offset`` of an ``every`` job: a duration shorter than ``interval``, or "auto" for a
    phase derived from the job's name (the same on every host)."""
    if value == "auto":
        from taskd.schedule.triggers import stable_offset

        return stable_offset(name, interval)
    try:
        offset = parse_duration(value)
    except ValueError as exc:
        raise ValueError(f'{exc}; or "auto" for a phase derived from the job name') from None
    if offset >= interval:
        raise ValueError(
            f"must be less than the interval ({format_duration(interval)}), got {value!r}; "
            'it is the phase within each interval ("auto" derives one from the job name)'
        )
    return offset


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "512MiB", "2GB", "1048576"."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size like "512MiB", got {value!r}')
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = (match.group(2) or "B").lower()
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(
            f'expected a size like "512MiB", "2GB" or a number of bytes, got {value!r}'
        )
    if size <= 0:
        raise ValueError(f"a size must be > 0, got {value!r}")
    return size
