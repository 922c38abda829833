"""NoFleetLedger: the ledger of ``scope = "fleet"`` jobs while the daemon has no fleet to
claim their runs from. It refuses every run: a fleet job never runs unclaimed, where every
host of the fleet would run the same tick."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from taskd.ledger._base import Claim, NotClaimed
from taskd.run.events import SkipReason

if TYPE_CHECKING:
    from taskd.ledger._base import Ledger
    from taskd.run.runner import RunInfo
    from taskd.run.sinks import RunEnd


class NoFleetLedger:
    """A :class:`~taskd.ledger.Ledger` that refuses every run as ``fleet_unavailable``
    (saying ``detail``). The cursor and the pause flag go to ``local``, the host's ledger,
    as a fleet ledger's do: the refused ticks count as handled."""

    __slots__ = ("detail", "local")
    may_refuse: ClassVar[bool] = True

    def __init__(self, local: Ledger, detail: str) -> None:
        self.local = local
        self.detail = detail

    def advance(self, job: str, tick: float) -> None:
        self.local.advance(job, tick)

    def open_run(self, info: RunInfo) -> Claim | None:
        return None

    async def claim(self, info: RunInfo) -> Claim:
        raise NotClaimed(SkipReason.FLEET_UNAVAILABLE, self.detail)

    def advance_and_open(self, job: str, tick: float, info: RunInfo) -> Claim:
        raise AssertionError("a ledger that may refuse never opens a run on the fused path")

    def finish(self, end: RunEnd) -> None:
        raise AssertionError("a run this ledger refused never ends")

    def set_paused(self, job: str, paused: bool) -> None:
        self.local.set_paused(job, paused)
