"""The daemon's fleet: a FleetLedger in the runtime's "fleet" slot, made only when a job has
``scope = "fleet"`` (taskd.fleet, and asyncpg with it, is imported only then: a daemon of
host jobs never loads either)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from taskd.fleet.ledger import FleetLedger
    from taskd.reload import Loaded
    from taskd.run.runtime import Runtime
    from taskd.schedule.jobset import JobSet
    from taskd.state.store import StateStore


log = structlog.get_logger("taskd.daemon")


def fleet_jobs(loaded: Loaded) -> list[str]:
    return [n for n, s in loaded.specs.items() if s.config.scope == "fleet"]


async def open_fleet(loaded: Loaded, rt: Runtime, store: StateStore) -> FleetLedger | None:
    """The fleet ledger, connected (or reconnecting), in ``rt.ledgers["fleet"]``; None when
    no job is a fleet job. Before the jobs start, so they pick it by their scope."""
    cfg = loaded.config.fleet
    names = fleet_jobs(loaded)
    if cfg is None or not names:
        return None
    from taskd._version import __version__
    from taskd.fleet.ledger import FleetLedger
    from taskd.ledger import LocalLedger

    fleet = FleetLedger.build(LocalLedger(store), cfg, __version__)
    fleet.history_max_age = loaded.config.daemon.history_max_age
    rt.ledgers["fleet"] = fleet
    await fleet.open(loaded.specs[n].config for n in names)
    return fleet


def attach_fleet(fleet: FleetLedger | None, jobset: JobSet) -> None:
    if fleet is not None:
        fleet.attach(jobset)


def reload_fleet(fleet: FleetLedger | None, loaded: Loaded) -> None:
    """A reload: the fleet jobs now (a job that became a fleet job in a daemon without a
    fleet ledger is refused as fleet_unavailable until a restart: [fleet] is read at start)."""
    if fleet is not None:
        fleet.reconfigure(loaded.specs[n].config for n in fleet_jobs(loaded))
    elif fleet_jobs(loaded):
        log.warning(
            "restart_needed",
            key="fleet",
            hint="the first fleet job: the fleet's database is connected at start; until "
            "then its ticks are skipped as fleet_unavailable",
        )
