"""The Trigger protocol (when a job fires) and upcoming(), the next few fire times."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
