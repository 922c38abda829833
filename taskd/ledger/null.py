"""NullLedger: keeps no record. For runs that must not move a daemon's schedule or history:
``taskd exec`` and the test kit (taskd.testing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Final

from taskd.ledger._base import HOST_CLAIM, Claim

if TYPE_CHECKING:
    from taskd.run.runner import RunInfo
    from taskd.run.sinks import RunEnd


class NullLedger:
    """A :class:`~taskd.ledger.Ledger` that writes nothing and grants every run. Stateless:
    the one instance, :data:`NULL_LEDGER`, serves every runtime."""

    __slots__ = ()
    may_refuse: ClassVar[bool] = False

    def advance(self, job: str, tick: float) -> None:
        pass

    def open_run(self, info: RunInfo) -> Claim:
        return HOST_CLAIM

    async def claim(self, info: RunInfo) -> Claim:
        return HOST_CLAIM

    def advance_and_open(self, job: str, tick: float, info: RunInfo) -> Claim:
        return HOST_CLAIM

    def finish(self, end: RunEnd) -> None:
        pass

    def set_paused(self, job: str, paused: bool) -> None:
        pass


NULL_LEDGER: Final = NullLedger()
