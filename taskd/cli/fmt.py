"""Text for humans: tables, times, durations and abbreviated values, as the read commands
(``history``, ``status``, ``jobs``) print them. Pure functions, no I/O; ``--json`` output never
goes through here, so nothing a script needs is lost to abbreviation.

Conventions every helper keeps: ``None`` (no value) prints as ``-``; every result is one line;
widths count display cells (a CJK character is two, a combining mark none), not characters;
and what a job, a plugin or a state file wrote is shown, never obeyed: control characters
(an escape sequence could recolour, retitle or clear the terminal), bidi controls (U+202E
shows text backwards) and lone surrogates (which cannot be encoded, and made ``print``
raise) are printed as backslash escapes (:func:`safe`).
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from collections.abc import Collection, Sequence
from typing import Any

__all__ = [
    "NONE",
    "duration",
    "json_value",
    "local_time",
    "one_line",
    "relative",
    "safe",
    "safe_lines",
    "table",
    "text_width",
]

NONE = "-"  # what a missing value prints as, in every column
ELLIPSIS = "…"
GAP = "  "  # between columns, as systemctl and supervisorctl do
# Marks a result the store cut to its size limit (taskd.state.writes.bounded): the stored
# value is then a JSON string holding the start of the original JSON text plus this.
TRUNCATED_MARK = "...(truncated)"
_SPACE = re.compile(r"\s+")
# What a terminal would act on or cannot show: C0 and C1 controls and DEL, the line and
# paragraph separators, the bidi controls (embeddings, overrides, isolates, marks), and
# surrogates (only ever lone in a str: JSON's "\ud800" parses to one).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """``text`` with every character a terminal would act on, or cannot show, written as a
    backslash escape (``\\x1b``, ``\\u202e``, ``\\ud800``); newlines and tabs included. The
    rest, wide and combining characters and emoji included, is left as it is."""
    return _UNSAFE.sub(_escape, text)


def safe_lines(text: str) -> str:
    """:func:`safe` for a block of lines (a traceback): each line made safe, the line
    breaks kept."""
    return "\n".join(safe(line) for line in text.splitlines())


# -- tables ------------------------------------------------------------------------------------


def text_width(text: str) -> int:
    """How many terminal cells ``text`` takes: wide (CJK) characters count two, combining
    marks none. An approximation of wcwidth that needs no dependency."""
    if text.isascii():
        return len(text)
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[int] = ()
) -> str:
    """Rows under a header line, columns aligned and separated by two spaces, like
    ``systemctl list-timers``. ``right`` holds the indexes of columns to right-align (numbers,
    durations). No line has trailing whitespace; there is no final newline.

    Cells are meant to be one line already (see :func:`one_line`); a newline or tab left in
    one is turned into a space so it cannot break the layout, and any other control
    character is escaped (:func:`safe`). Raises ValueError when a row has a different number
    of cells than ``headers``.
    """
    ncols = len(headers)
    grid = [[_flat(h) for h in headers]]
    for i, row in enumerate(rows):
        if len(row) != ncols:
            raise ValueError(f"row {i} has {len(row)} cells for {ncols} headers")
        grid.append([_flat(cell) for cell in row])
    widths = [max(text_width(line[c]) for line in grid) for c in range(ncols)]
    lines = []
    for line in grid:
        cells = []
        for c, cell in enumerate(line):
            pad = " " * (widths[c] - text_width(cell))
            cells.append(pad + cell if c in right else cell + pad)
        lines.append(GAP.join(cells).rstrip())
    return "\n".join(lines)


def _flat(cell: str) -> str:
    return safe(cell.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " "))


# -- times -------------------------------------------------------------------------------------


def local_time(ts: float | None) -> str:
    """``2026-12-02 14:05:03`` in the local time zone (``TZ``, else the system's), or ``-``."""
    if ts is None or not math.isfinite(ts):
        return NONE
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):  # beyond what the C library can represent
        return f"@{ts:.0f}"


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def relative(ts: float | None, now: float) -> str:
    """``ts`` as seen from ``now``: ``in 12s``, ``in 4m``, ``1h 5m ago``, ``3d ago``; ``now``
    within a second, ``-`` for None. At most two units, the second dropped when zero."""
    if ts is None or not math.isfinite(ts):
        return NONE
    delta = ts - now
    total = round(abs(delta))
    if total < 1:
        return "now"
    parts: list[str] = []
    for i, (unit, size) in enumerate(_UNITS):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            if i + 1 < len(_UNITS):
                next_unit, next_size = _UNITS[i + 1]
                rest = (total % size) // next_size
                if rest:
                    parts.append(f"{rest}{next_unit}")
            break
    text = " ".join(parts)
    return f"in {text}" if delta > 0 else f"{text} ago"


def duration(seconds: float | None) -> str:
    """A run's length, as precise as is useful at its scale: ``12µs``, ``350ms``, ``1.2s``,
    ``42s``, ``2m 03s``, ``1h 02m``, ``3d 04h``; ``-`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return NONE
    if seconds < 0:  # a clock stepped back mid-run; show it rather than hide it
        return "-" + duration(-seconds)
    if seconds == 0:
        return "0s"
    # Each scale rounds first, then checks it still fits, so 999.6ms becomes "1.0s" and
    # 59.6s becomes "1m 00s" rather than "1000ms" and "60s".
    micros = round(seconds * 1e6)
    if micros < 1:
        return "<1µs"
    if micros < 1000:
        return f"{micros}µs"
    millis = round(seconds * 1e3)
    if millis < 1000:
        return f"{millis}ms"
    tenths = round(seconds * 10)
    if tenths < 100:
        return f"{tenths / 10:.1f}s"
    secs = round(seconds)
    if secs < 60:
        return f"{secs}s"
    mins, secs = divmod(secs, 60)
    if mins < 60:
        return f"{mins}m {secs:02d}s"
    hours, mins = divmod(mins, 60)
    if hours < 24:
        return f"{hours}h {mins:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


# -- abbreviated values ------------------------------------------------------------------------


def one_line(text: str | None, width: int) -> str:
    """``text`` with every run of whitespace (newlines included) made one space, any other
    control character escaped (:func:`safe`), cut to ``width`` display cells ending in ``…``
    when longer. None gives an empty string: an empty cell reads better than ``-`` in a
    free-text column."""
    if text is None or width <= 0:
        return ""
    flat = safe(_SPACE.sub(" ", text).strip())
    if text_width(flat) <= width:
        return flat
    out: list[str] = []
    used = 0
    for ch in flat:
        w = text_width(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out).rstrip() + ELLIPSIS


# How a container is shortened when its compact JSON is too wide, gentlest first: the longest
# string kept inside it, and how deep nested containers are shown before becoming {…} / […].
_SHORTENINGS = ((40, 2), (12, 1), (6, 1))


def json_value(value: Any, width: int) -> str:
    """A JSON-able value (a parsed result) in at most ``width`` cells: compact JSON, in which
    long strings inside containers and nested containers are shortened first (more and more
    until it fits), so a 5 KB dict still shows its keys (``{"blob": "xxxx…", "n": 5}``)
    rather than the start of one long string. A result the store cut to its size limit ends
    in `` [truncated]``.
    """
    if value is None:
        return "null"
    if isinstance(value, str) and value.endswith(TRUNCATED_MARK):
        # The stored text is the start of the original JSON: show that, and say it was cut.
        suffix = " [truncated]"
        return one_line(value[: -len(TRUNCATED_MARK)], max(width - len(suffix), 1)) + suffix
    text = ""
    for max_string, max_depth in _SHORTENINGS:
        text = _compact(value, 0, max_string, max_depth)
        if text_width(text) <= width or not isinstance(value, dict | list | tuple):
            break
    return one_line(text, width)


def _compact(value: Any, depth: int, max_string: int, max_depth: int) -> str:
    if isinstance(value, dict):
        if not value:
            return "{}"
        if depth >= max_depth:
            return "{" + ELLIPSIS + "}"
        items = (
            f"{json.dumps(str(k), ensure_ascii=False)}: "
            + _compact(v, depth + 1, max_string, max_depth)
            for k, v in value.items()
        )
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        if depth >= max_depth:
            return "[" + ELLIPSIS + "]"
        return "[" + ", ".join(_compact(v, depth + 1, max_string, max_depth) for v in value) + "]"
    if isinstance(value, str) and depth > 0 and len(value) > max_string:
        return json.dumps(value[: max_string - 1], ensure_ascii=False)[:-1] + ELLIPSIS + '"'
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON-able: a caller passed something else
        return repr(value)
