"""Human forms of times and durations, for Trigger.describe()."""

from __future__ import annotations

from datetime import UTC, datetime


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
