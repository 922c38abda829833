"""The ledger seam: the one way the scheduler and the runner put a job's ticks and runs on
record. The store (taskd.state.store) keeps its reads; a ledger is the write half only.

Every method is synchronous and never waits on I/O: a host job's run path gains no await
from the seam. A host ledger grants every run at once (``open_run`` returns
:data:`HOST_CLAIM`, a shared constant, so the host path allocates nothing)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from taskd.run.runner import RunInfo
    from taskd.run.sinks import RunEnd


@dataclass(frozen=True, slots=True)
class Claim:
    """A run's right to run its tick, as its ledger granted it. Frozen: one instance
    (:data:`HOST_CLAIM`) is shared by every host run."""

    fence: int | None = None  # a fencing token; None for a host or exec run
    owner: str | None = None  # the node holding a fleet claim
    lease_until: float = math.inf  # when a fleet claim's lease ends (epoch seconds)


HOST_CLAIM: Final = Claim()


class Ledger(Protocol):
    """Where a job's ticks and runs go on record (``LocalLedger``: this host's state store;
    ``NullLedger``: nowhere)."""

    def advance(self, job: str, tick: float) -> None:
        """``job`` has handled every tick up to ``tick`` (run or skipped): its cursor. On
        record before the next run starts, so a restart neither runs those ticks again nor
        skips later ones."""

    def open_run(self, info: RunInfo) -> Claim:
        """The run in ``info`` is about to start: on record before the job's code runs (a
        crash after this leaves the run ``interrupted`` in the history, never forgotten)."""

    def advance_and_open(self, job: str, tick: float, info: RunInfo) -> Claim:
        """:meth:`advance` to ``tick`` and :meth:`open_run` for a run of that tick, in one
        write: the scheduler's fused path for the common run."""

    def finish(self, end: RunEnd) -> None:
        """The run has ended: its history row and the job's last run (batched into a later
        commit; on record at once where the ledger can)."""

    def set_paused(self, job: str, paused: bool) -> None:
        """``taskd pause``/``resume``: on record before the command answers."""
