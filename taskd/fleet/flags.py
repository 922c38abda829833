"""The fleet-wide pause flags of a FleetLedger (a mixin): a pause made here is published to
the fleet; notices, claim answers and re-reads apply the fleet's flag here. Those answers
reach a host on two connections in no set order, so each carries the flag's version (its
paused_at, µs) and one older than the flag applied is ignored."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from taskd.config.model import JobConfig
    from taskd.fleet.db import FleetDB
    from taskd.fleet.held import Scheduler
    from taskd.ledger import LocalLedger

log = structlog.get_logger("taskd.fleet")


class PauseFlags:
    """What FleetLedger keeps of the fleet's pause flags, and how they are applied."""

    local: LocalLedger
    db: FleetDB
    jobs: dict[str, JobConfig]
    scheduler: Scheduler | None
    flags: dict[str, bool]  # the fleet's pause flags, as last known
    flag_at: dict[str, int]  # their versions (paused_at, µs)
    _publishing: set[asyncio.Task[None]]

    def set_paused(self, job: str, paused: bool) -> None:
        self.local.set_paused(job, paused)
        if self.flags.get(job) == paused:
            return  # the fleet's flag already (a notice, or the claim's answer)
        self.flags[job] = paused
        task = asyncio.get_running_loop().create_task(self._publish(job, paused))
        self._publishing.add(task)  # a strong reference until it is done
        task.add_done_callback(self._publishing.discard)

    async def publish_paused(self, job: str, paused: bool) -> None:
        """Pause or resume ``job`` fleet-wide; raises FleetDown (the pause was not made)."""
        await self.db.set_paused(job, paused)
        self.flags[job] = paused

    async def _resync(self) -> None:
        """Pause notices may have been missed: the flags as the database has them."""
        if self.jobs:
            for job, (paused, at) in (await self.db.flags(list(self.jobs))).items():
                self._apply_flag(job, paused, at)

    def _notice(self, job: str, paused: bool, by: str, at: int | None = None) -> None:
        if job in self.jobs:
            log.debug("fleet_pause_notice", job=job, paused=paused, by=by)
            self._apply_flag(job, paused, at)

    def _apply_flag(self, job: str, paused: bool, at: int | None = None) -> None:
        """The fleet's flag as an answer gave it (``at``: its version, None: unknown, e.g.
        a local pause): ignored if older than the one applied."""
        if at is not None:
            if at < self.flag_at.get(job, at):
                log.debug("fleet_pause_stale", job=job, paused=paused)
                return
            self.flag_at[job] = at
        self.flags[job] = paused  # first: the set_paused below must not publish it again
        if self.scheduler is not None:
            with contextlib.suppress(LookupError):
                self.scheduler.set_paused(job, paused)

    async def _publish(self, job: str, paused: bool) -> None:
        try:
            await self.db.set_paused(job, paused)
        except Exception as exc:  # the local pause holds; the fleet did not hear of it
            log.warning("fleet_pause_not_published", job=job, paused=paused,
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip
