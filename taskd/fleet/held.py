"""What a FleetLedger keeps per claim this host holds, the clock its local deadlines use, and
what it asks of the scheduler."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from taskd.config.model import JobConfig
    from taskd.run.events import SkipReason


def boottime() -> float:
    """CLOCK_BOOTTIME: it runs on while the host is suspended, as the database's lease does
    (a monotonic clock would stand still then, and a woken host would trust a dead lease)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Scheduler(Protocol):
    """What the ledger asks of the scheduler (taskd.schedule.jobset.JobSet)."""

    def take_over(self, name: str, tick: float) -> SkipReason | None: ...
    def cancel_run(self, name: str, run_id: str, reason: str) -> bool: ...
    def catch_up(self, name: str, first: float, last: float) -> None: ...
    def set_paused(self, name: str, paused: bool) -> bool: ...


@dataclass(slots=True)
class Held:
    """A claim this host holds: its run, and until when (CLOCK_BOOTTIME) it may trust it."""

    job: str
    fence: int
    tick: float
    run_id: str
    valid_until: float
    ended: bool = False  # the run ended; its finish waits to be written
    lost: bool = False  # taken over, or the local deadline passed: the run was cancelled


def spec_hash(cfg: JobConfig) -> str:
    """What makes hosts compute the same ticks and claim them alike: a job whose hash
    differs between hosts runs on both (their ticks differ), so it is logged."""
    key = (cfg.type, cfg.schedule, cfg.every, cfg.offset, cfg.cron, cfg.at, cfg.timezone,
           cfg.grace, cfg.overlap, cfg.catchup)  # fmt: skip
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]
