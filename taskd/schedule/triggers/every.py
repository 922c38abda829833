"""Every: fires every ``interval``, anchored (never drifting), at the job's ``offset``
phase; stable_offset() derives that phase from the job's name (``offset = "auto"``)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from taskd.schedule.triggers.base import Trigger
from taskd.schedule.triggers.describe import _format_seconds, _iso


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
