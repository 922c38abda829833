"""FleetState: ``ctx.state`` of a fleet run. The fleet's shared state lives in taskd.state in
its database, and a run's writes are fenced: kept only while the run's claim is live and its
own, and never over a value a newer fence wrote. A run whose claim was taken over has its
writes refused (:class:`FencedOut`), so a stale owner never overwrites its successor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import structlog

from taskd.fleet.conn import FleetDown
from taskd.state.shared import SharedState, _Tracked

if TYPE_CHECKING:
    from taskd.fleet.db import FleetDB

log = structlog.get_logger("taskd.fleet")

LARGE: Final = 10_000  # keys; fleet state is read whole at each locked(): meant to stay small


class FencedOut(RuntimeError):
    """A fleet run's write to shared state was refused: its claim is no longer its own."""


class FleetState(SharedState):
    """The same API as :class:`SharedState` for the job: ``locked()`` yields a mutable view
    of the whole fleet state (read at entry) and writes the changed keys at exit, in one
    transaction, fenced by the run's claim. ``get``/``snapshot`` read what the last
    ``locked()`` read (empty before the first)."""

    def __init__(self, db: FleetDB, job: str, fence: int) -> None:
        super().__init__()
        self.db = db
        self.job = job
        self.fence = fence

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[MutableMapping[str, Any]]:
        async with self.lock:  # one block at a time within this run
            try:
                self._data = await self.db.get_state()
            except FleetDown as exc:
                raise FencedOut(f"fleet state unavailable: {exc}") from None
            if len(self._data) > LARGE:
                log.warning("fleet_state_large", keys=len(self._data), job=self.job)
            view = _Tracked(self._data)
            yield view
            if not view.changed:
                return
            items = {k: self._data[k] for k in view.changed if k in self._data}
            deleted = [k for k in view.changed if k not in self._data]
            # Shielded: a cancel (the claim lost at the same time) must not leave the
            # verdict unknown; the write's own task logs a refusal either way.
            if not await asyncio.shield(self._write(items, deleted)):
                raise FencedOut(
                    f"fenced out: fence {self.fence} no longer holds job {self.job!r}; "
                    f"another host took it over, and these writes were refused"
                )

    async def _write(self, items: dict[str, Any], deleted: list[str]) -> bool:
        try:
            ok = await self.db.put_state(self.fence, self.job, items, deleted)
        except FleetDown as exc:
            log.warning("fenced_write_refused", job=self.job, fence=self.fence,
                        keys=sorted([*items, *deleted]), why=str(exc))  # fmt: skip
            return False
        if not ok:
            log.warning("fenced_write_refused", job=self.job, fence=self.fence,
                        keys=sorted([*items, *deleted]), why="the claim is not this run's")  # fmt: skip
        return ok
