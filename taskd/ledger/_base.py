"""The ledger seam: the one way the scheduler and the runner put a job's ticks and runs on
record. The store (taskd.state.store) keeps its reads; a ledger is the write half only.

Every method but :meth:`Ledger.claim` is synchronous and never waits on I/O: a host job's run
path gains no await from the seam. A host ledger grants every run at once (``open_run``
returns :data:`HOST_CLAIM`, a shared constant, so the host path allocates nothing). A ledger
that must ask a remote party first (a fleet's database) returns None from ``open_run``; only
then does the runner await :meth:`Ledger.claim`, which may refuse the run
(:class:`NotClaimed`): its tick becomes a skip, never a run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Protocol

from taskd.run.events import SkipReason

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

# A run's claim while its ledger is being asked (``await Ledger.claim``): never granted, so a
# run cancelled then was never opened and leaves no record (runner.never_claimed).
CLAIMING: Final = Claim(owner="")


class NotClaimed(Exception):
    """The ledger refused the run: its tick is skipped with ``reason`` (a manual run is
    answered with it), and no run line or history row is written. ``detail`` says more for
    the log; ``holder`` is who has the tick instead, when the ledger knows."""

    def __init__(self, reason: SkipReason, detail: str = "", holder: str | None = None) -> None:
        super().__init__(reason, detail, holder)
        self.reason = reason
        self.detail = detail
        self.holder = holder

    def __str__(self) -> str:
        text = f"not claimed: {self.reason}"
        if self.detail:
            text += f" ({self.detail})"
        if self.holder:
            text += f"; held by {self.holder}"
        return text


class Ledger(Protocol):
    """Where a job's ticks and runs go on record (``LocalLedger``: this host's state store;
    ``NullLedger``: nowhere)."""

    # True for a ledger whose ``open_run`` may return None (it asks a remote party, and
    # ``claim`` may refuse). Such a job never takes the scheduler's fused path, which puts a
    # run on record without a claim (``advance_and_open``).
    may_refuse: ClassVar[bool]

    def advance(self, job: str, tick: float) -> None:
        """``job`` has handled every tick up to ``tick`` (run or skipped): its cursor. On
        record before the next run starts, so a restart neither runs those ticks again nor
        skips later ones."""

    def open_run(self, info: RunInfo) -> Claim | None:
        """The run in ``info`` is about to start: on record before the job's code runs (a
        crash after this leaves the run ``interrupted`` in the history, never forgotten).
        None when the run must be claimed first: the runner then awaits :meth:`claim`."""

    async def claim(self, info: RunInfo) -> Claim:
        """Claim the run in ``info`` from the remote party, and put it on record as
        :meth:`open_run` does; raises :class:`NotClaimed` when refused. Only awaited after
        ``open_run`` returned None. A ledger that may refuse grants with a claim of its own,
        never :data:`HOST_CLAIM` or :data:`CLAIMING` (runner.never_claimed tells them apart)."""

    def advance_and_open(self, job: str, tick: float, info: RunInfo) -> Claim:
        """:meth:`advance` to ``tick`` and :meth:`open_run` for a run of that tick, in one
        write: the scheduler's fused path for the common run. Never called on a ledger that
        ``may_refuse`` (its runs are claimed first)."""

    def finish(self, end: RunEnd) -> None:
        """The run has ended: its history row and the job's last run (batched into a later
        commit; on record at once where the ledger can)."""

    def set_paused(self, job: str, paused: bool) -> None:
        """``taskd pause``/``resume``: on record before the command answers."""
