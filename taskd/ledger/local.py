"""LocalLedger: this host's record of its jobs' ticks and runs, in its state store (the tick
journal and SQLite, taskd.state.store), written exactly as before the seam existed."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from taskd.ledger._base import HOST_CLAIM, Claim

if TYPE_CHECKING:
    from taskd.run.runner import RunInfo
    from taskd.run.sinks import RunEnd
    from taskd.state.store import StateStore


class LocalLedger:
    """A :class:`~taskd.ledger.Ledger` over one :class:`StateStore`: each call is one store
    write. Every run is granted (:data:`HOST_CLAIM`): this host answers to no one."""

    __slots__ = ("store",)
    may_refuse: ClassVar[bool] = False

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def advance(self, job: str, tick: float) -> None:
        self.store.set_tick(job, tick)

    def open_run(self, info: RunInfo) -> Claim:
        self.store.run_started(info.run_id, info.job, info.scheduled, info.started, info.cause)
        return HOST_CLAIM

    async def claim(self, info: RunInfo) -> Claim:
        # Never awaited (open_run grants every run); there for subclasses that ask first.
        self.open_run(info)
        return HOST_CLAIM

    def advance_and_open(self, job: str, tick: float, info: RunInfo) -> Claim:
        self.store.tick_and_run_started(job, tick, info.run_id, info.started, info.cause)
        return HOST_CLAIM

    def finish(self, end: RunEnd) -> None:
        info = end.info
        self.store.run_finished(
            info.run_id,
            end.spec.config.name,
            info.scheduled,
            info.started,
            info.attempt,
            end.duration,
            end.outcome,
            info.error,
            info.cause,
            end.result_json,
            end.failures,
        )

    def set_paused(self, job: str, paused: bool) -> None:
        self.store.set_paused(job, paused)
