"""At: fires once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from taskd.schedule.triggers.base import Trigger
from taskd.schedule.triggers.describe import _iso


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
