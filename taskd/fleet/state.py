"""FleetState: ``ctx.state`` of a fleet run. The fleet's shared state lives in taskd.state in
its database.

The guarantee: a ``locked()`` block is one critical section across the whole fleet, as a
host's SharedState block is across one host. It runs inside one database transaction that
holds a fleet-wide lock from the read at entry to the write at exit, so two blocks anywhere
never interleave and a read-modify-write (a counter) is never lost. Its writes are kept only
if the run's claim is still live and its own when the block ends: a run whose tick was taken
over, or whose claim ran out or ended, has them refused (:class:`FencedOut`, saying which),
so a stale owner never overwrites its successor. Nothing is kept from a refused block.

What that costs: each node holds one extra connection for it, and the fleet's blocks run one
at a time; a block must end within a lease (the database ends a transaction idle longer, and
a block waits at most a lease for the lock), or it is refused. While a block writes, its
claim's row is held, so the tick is not taken over until the write commits or the database
ends the transaction (a host frozen mid-block: after a lease idle; frozen in the few
microseconds between a statement's prepare and its execution, until it wakes or its
connection dies). A run's result written at its end is one statement of its own, outside
this lock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import structlog

from taskd.fleet import sql
from taskd.fleet.conn import FleetDown, is_gone
from taskd.state.shared import SharedState, _Tracked

if TYPE_CHECKING:
    import asyncpg

    from taskd.fleet.db import FleetDB

log = structlog.get_logger("taskd.fleet")

LARGE: Final = 10_000  # keys; fleet state is read whole at each locked(): meant to stay small


class FencedOut(RuntimeError):
    """A fleet run's write to shared state was refused: its claim is no longer its own."""


class FleetState(SharedState):
    """The same API as :class:`SharedState` for the job: ``locked()`` yields a mutable view
    of the whole fleet state and writes the changed keys at exit, atomically fleet-wide (see
    the module). ``get``/``snapshot`` read what the last ``locked()`` read (empty before the
    first)."""

    def __init__(self, db: FleetDB, job: str, fence: int) -> None:
        super().__init__()
        self.db = db
        self.job = job
        self.fence = fence

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[MutableMapping[str, Any]]:
        async with self.lock:  # one block at a time within this run
            pool = await _pool(self.db)
            try:
                async with pool.acquire() as c, c.transaction():
                    await c.execute(sql.STATE_LOCK)
                    rows = await c.fetch(sql.GET_STATE)
                    self._data = {r["key"]: json.loads(r["value"]) for r in rows}
                    if len(self._data) > LARGE:
                        log.warning("fleet_state_large", keys=len(self._data), job=self.job)
                    view = _Tracked(self._data)
                    yield view
                    if view.changed:
                        await self._write(c, view.changed)
            except FencedOut:
                raise
            except Exception as exc:
                if not _refused(exc):
                    raise
                why = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("fenced_write_refused", job=self.job, fence=self.fence, why=why)
                raise FencedOut(
                    f"fleet state unavailable, nothing of this block was kept: {why}"
                ) from None

    async def _write(self, c: asyncpg.Connection, changed: set[str]) -> None:
        """The changes, if the claim is still this run's; else FencedOut (rolled back)."""
        row = await c.fetchrow(sql.STATE_CLAIM, self.fence)
        why = None
        if row is None or row["owner"] != self.db.node or row["job"] != self.job:
            why = "the claim was taken over by another host"
        elif row["state"] != "running":
            why = f"its claim has ended ({row['state']})"
        elif not row["live"]:
            why = "its lease ran out (no heartbeat got through in time)"
        if why is not None:
            log.warning("fenced_write_refused", job=self.job, fence=self.fence,
                        keys=sorted(changed), why=why)  # fmt: skip
            raise FencedOut(
                f"fenced out: fence {self.fence} no longer holds job {self.job!r}: {why}; "
                f"the writes of this block were refused"
            )
        items = {k: self._data[k] for k in changed if k in self._data}
        if items:
            await c.execute(sql.STATE_PUT, list(items), [json.dumps(v) for v in items.values()],
                            self.fence, self.job)  # fmt: skip
        deleted = [k for k in changed if k not in self._data]
        if deleted:
            await c.execute(sql.STATE_DEL, deleted)


def _refused(exc: BaseException) -> bool:
    """The database is gone, or ended the block's transaction (held or waited past a lease)."""
    import asyncpg

    ended = (FleetDown, asyncpg.LockNotAvailableError, asyncpg.IdleInTransactionSessionTimeoutError)
    return is_gone(exc) or isinstance(exc, ended)


async def _pool(db: FleetDB) -> asyncpg.Pool:
    """The node's one connection for state blocks (its own: a block waiting for the lock must
    not hold a connection claims and heartbeats need). A block may take a lease, so the
    statement timeout is longer than the pool's; the lock wait and an idle transaction end
    after a lease, so a block on a host that died does not hold the fleet's state for long."""
    import asyncpg

    if db.state != "up":
        raise FencedOut(f"fleet state unavailable: {db.conn.last_error or db.state}")
    async with db.state_lock:
        if db.state_pool is None:
            kw = await db.conn.connect_kwargs("taskd-state")
            lease_ms = str(int(db.cfg.lease * 1000))
            kw["command_timeout"] = db.cfg.lease + db.conn.command_timeout
            kw["server_settings"] = {**kw["server_settings"], "lock_timeout": lease_ms,
                                     "idle_in_transaction_session_timeout": lease_ms}  # fmt: skip
            try:
                db.state_pool = await asyncpg.create_pool(min_size=0, max_size=1, **kw)
            except Exception as exc:
                raise FencedOut(f"fleet state unavailable: {type(exc).__name__}: {exc}") from None
        return db.state_pool


__all__ = ["FencedOut", "FleetState"]
