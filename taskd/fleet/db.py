"""FleetDB: the fleet's statements (taskd.fleet.sql) as typed calls over one pool.

Each call is one round trip (a finish with a result is one transaction of two). A lost
database raises :class:`~taskd.fleet.conn.FleetDown` at once and starts the reconnect; a
call while it is down fails without touching the network. The LISTEN connection is separate
from the pool, so a notice never waits behind a claim."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from taskd.fleet import schema, sql
from taskd.fleet.conn import (
    POOL_SIZE,
    Conn,
    FleetDown,
    from_ts,
    interval,
    is_gone,
    to_ts,
    version,
)
from taskd.fleet.notify import Listener

if TYPE_CHECKING:
    from taskd.config.model import FleetConfig

EARLY_SLACK: Final = 1.0  # how early (DB clock) a claim may come: hosts' clocks differ
MANUAL_WINDOW: Final = 36500 * 86400.0  # a manual claim is never late (PG 15: no infinity)
SWEEP_BATCH: Final = 100
PRUNE_BATCH: Final = 1000
# Claims in flight at once: one fewer than the pool's connections (taskd.fleet.conn), so the
# writer, the heartbeat and the sweep always find one free however many ticks are claimed.
CLAIM_SLOTS: Final = POOL_SIZE - 1


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """A claim's answer: ``fence`` set when won; else ``why`` (paused, early, late, overlap,
    taken, unknown) and maybe the ``holder`` of a taken tick."""

    fence: int | None
    tick: float
    lease_until: float | None
    db_now: float
    why: str | None
    holder: str | None
    paused_at: int | None = None  # the job's pause flag's version (µs), as the claim saw it


@dataclass(frozen=True, slots=True)
class Beat:
    kept: frozenset[int]  # the fences sent that this node still holds
    db_now: float
    offset: float  # the DB clock minus this host's, at mid-flight


@dataclass(frozen=True, slots=True)
class Swept:
    job: str
    tick: float
    kind: str
    fence: int
    state: str  # running: this node took it over; abandoned
    cause: str
    lost_owners: tuple[str, ...]
    lease_until: float


@dataclass(frozen=True, slots=True)
class NodeHolder:
    pid: int | None
    boot_id: str | None
    addr: str | None
    live: bool


class NodeTaken(RuntimeError):
    """Another live taskd uses this node name."""


class FleetDB:
    """The statements of the claim protocol for one node."""

    def __init__(self, cfg: FleetConfig, node: str, version: str = "") -> None:
        self.cfg = cfg
        self.node = node
        self.conn = Conn(cfg, node)
        self.version = version
        self.pid = os.getpid()
        self.boot_id = _boot_id()
        self.lease = interval(cfg.lease)
        self.listener = Listener(self.conn, node)
        # ctx.state blocks' own connection (taskd.fleet.state), opened at the first block.
        self.state_pool: Any = None
        self.state_lock = asyncio.Lock()
        self.claim_slots = asyncio.Semaphore(CLAIM_SLOTS)

    @property
    def state(self) -> str:
        return self.conn.state

    async def open(self) -> None:
        """Connect, migrate the schema, check the node name, mark the node alive. Raises
        SchemaTooNew, NodeTaken or a connection error: fleet jobs cannot start."""
        await self.conn.open()
        await self.prepare()

    async def prepare(self) -> None:
        """The schema, the node check and the node's first heartbeat (after the pool is
        open: at :meth:`open`, or after a first connect that failed, when it comes)."""
        pool = self.conn.require()
        async with pool.acquire() as c:
            await schema.migrate(c)
        await self.check_node()
        await self.heartbeat(())

    async def close(self) -> None:
        await self.listener.close()  # first: its close is no lost database
        if self.state_pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.state_pool.close(), 2)
            self.state_pool.terminate()
        await self.conn.close()

    async def _call(self, how: str, query: str, *args: Any) -> Any:
        pool = self.conn.require()
        try:
            return await getattr(pool, how)(query, *args)
        except Exception as exc:
            if is_gone(exc):
                raise self.conn.gone(exc) from exc
            raise

    async def check_node(self) -> None:
        row = await self._call("fetchrow", sql.NODE, self.node, self.lease)
        if row is None or not row["live"]:
            return
        if row["pid"] == self.pid and row["boot_id"] == self.boot_id:
            return
        if row["boot_id"] == self.boot_id and not _alive(row["pid"]):
            return  # our own predecessor on this host, restarted within a lease
        raise NodeTaken(
            f"[fleet] node {self.node!r} is in use by another live taskd (pid {row['pid']}, "
            f"from {row['addr'] or 'a local socket'}): give each host its own node name"
        )

    async def claim(
        self,
        job: str,
        tick: float | None,
        cause: str,
        *,
        window: float,
        overlap_skip: bool,
        kind: str = "s",
    ) -> ClaimResult:
        """Claim ``tick`` of ``job`` (None: a manual run, kind 'm', at the DB's now())."""
        args = (
            job,
            None if tick is None else to_ts(tick),
            kind,
            self.node,
            cause,
            interval(window),
            interval(EARLY_SLACK),
            self.lease,
            overlap_skip,
        )
        async with self.claim_slots:
            row = await self._call("fetchrow", sql.CLAIM, *args)
        if row["why"] == "unknown":
            # The job's row is missing (registered before this host's start check, or
            # deleted by hand): add it and claim once more.
            await self.register({job: ""})
            async with self.claim_slots:
                row = await self._call("fetchrow", sql.CLAIM, *args)
        lease = row["lease_until"]
        return ClaimResult(
            row["fence"],
            from_ts(row["tick"]),
            None if lease is None else from_ts(lease),
            from_ts(row["db_now"]),
            row["why"],
            row["holder"],
            version(row["paused_at"]),
        )

    async def claim_manual(self, job: str, cause: str, *, overlap_skip: bool) -> ClaimResult:
        return await self.claim(
            job, None, cause, window=MANUAL_WINDOW, overlap_skip=overlap_skip, kind="m"
        )

    async def heartbeat(self, fences: Sequence[int]) -> Beat:
        """Extend the lease of ``fences`` and mark the node alive."""
        sent = time.time()
        row = await self._call(
            "fetchrow",
            sql.HEARTBEAT,
            self.node,
            list(fences),
            self.lease,
            self.pid,
            self.boot_id,
            self.version,
        )
        got = time.time()
        db_now = from_ts(row["db_now"])
        return Beat(frozenset(row["kept"]), db_now, db_now - (sent + got) / 2)

    async def sweep(
        self, jobs: Sequence[str], mine: Sequence[int] = (), *, limit: int = SWEEP_BATCH
    ) -> list[Swept]:
        """Take over (retry) or abandon the expired claims of ``jobs``, but not those whose
        fence is in ``mine`` (runs of this node, still going)."""
        rows = await self._call(
            "fetch",
            sql.SWEEP,
            self.node,
            list(jobs),
            self.cfg.on_owner_lost == "retry",
            self.lease,
            interval(self.cfg.claim_window),
            limit,
            self.cfg.max_takeovers,
            list(mine),
        )
        return [
            Swept(
                r["job"],
                from_ts(r["tick"]),
                r["kind"],
                r["fence"],
                r["state"],
                r["cause"],
                tuple(r["lost_owners"]),
                from_ts(r["lease_until"]),
            )
            for r in rows
        ]

    async def prune(
        self, max_age: float, *, claimable: float | None = None, limit: int = PRUNE_BATCH
    ) -> int:
        """Delete ended rows older than ``max_age`` (one batch), but not those of ticks less
        than ``claimable`` seconds old (they may still be claimed; None: the claim window
        and a lease); how many went."""
        if claimable is None:
            claimable = self.cfg.claim_window + self.cfg.lease
        done = await self._call("execute", sql.PRUNE, interval(max_age), limit, interval(claimable))
        return int(str(done).rsplit(" ", 1)[-1])

    async def running(self, jobs: Sequence[str]) -> list[Mapping[str, Any]]:
        rows = await self._call("fetch", sql.RUNNING, list(jobs))
        return [
            {
                "job": r["job"],
                "tick": from_ts(r["tick"]),
                "kind": r["kind"],
                "owner": r["owner"],
                "fence": r["fence"],
                "lease_until": from_ts(r["lease_until"]),
            }
            for r in rows
        ]

    async def finish(
        self,
        fence: int,
        job: str,
        state: str,
        *,
        attempts: int,
        duration: float,
        error: str | None,
        result_json: str | None,
        result_key: str | None = None,
    ) -> tuple[bool, bool | None]:
        """End the claim ``fence`` (and write its result, fenced, under ``result_key``).
        Returns (ended, result written or None when none was asked); (False, …): the claim
        was taken over, and nothing was kept."""
        row = await self._call(
            "fetchrow", sql.FINISH, fence, self.node, state, attempts, duration, error,
            result_json, result_key,
        )  # fmt: skip
        ended = row["ended"] is not None
        return ended, None if result_key is None else ended and row["wrote"] is not None

    async def finish_many(
        self, rows: Sequence[tuple[int, str, int, float, str | None, str | None, str | None]]
    ) -> list[tuple[bool, bool | None]]:
        """:meth:`finish` for many claims in one round trip: ``rows`` of (fence, state,
        attempts, duration, error, result_json, result_key); one (ended, wrote) each, in
        order. Raises if the database refuses any row's values (nothing is then kept)."""
        # In fence order: the heartbeat locks the same rows in fence order, and two
        # statements locking overlapping rows in different orders deadlock each other
        # (review: 17 of 40 rounds did, in the order finishes arrive).
        cols = list(zip(*sorted(rows, key=lambda r: r[0]), strict=True))
        got = await self._call(
            "fetch", sql.FINISH_MANY, list(cols[0]), self.node, list(cols[1]), list(cols[2]),
            list(cols[3]), list(cols[4]), list(cols[5]), list(cols[6]),
        )  # fmt: skip
        by_fence = {r["fence"]: (r["ended"] is not None, r["wrote"] is not None) for r in got}
        out: list[tuple[bool, bool | None]] = []
        for fence, *_, key in rows:
            ended, wrote = by_fence[fence]
            out.append((ended, None if key is None else ended and wrote))
        return out

    async def hand_back(self, fence: int, *, undo: int) -> bool:
        """Give the claim ``fence`` back unended (its lease ends now; ``undo`` takeovers are
        uncounted); False if it was not ours and running any more."""
        return await self._call("fetchval", sql.HAND_BACK, fence, self.node, undo) is not None

    async def put_state(
        self, fence: int, job: str, items: Mapping[str, Any], deleted: Sequence[str] = ()
    ) -> bool:
        """Write ``items`` and delete ``deleted`` fenced, all or none: False (nothing kept)
        if any key was refused (the claim is not live and ours, or a newer fence wrote it).
        A per-key write without the fleet-wide lock: ``ctx.state`` does not use it (see
        taskd.fleet.state, whose blocks are atomic fleet-wide and not fenced across claims)."""
        pool = self.conn.require()
        try:
            async with pool.acquire() as c:
                tx = c.transaction()
                await tx.start()
                for key, value in items.items():
                    got = await c.fetchval(
                        sql.PUT_STATE, key, json.dumps(value), fence, self.node, job
                    )
                    if got is None:
                        await tx.rollback()
                        return False
                for key in deleted:
                    if not await c.fetchval(sql.DEL_STATE, key, fence, self.node, job):
                        await tx.rollback()
                        return False
                await tx.commit()
                return True
        except Exception as exc:
            if is_gone(exc):
                raise self.conn.gone(exc) from exc
            raise

    async def get_state(self) -> dict[str, Any]:
        rows = await self._call("fetch", sql.GET_STATE)
        return {r["key"]: json.loads(r["value"]) for r in rows}

    async def set_paused(self, job: str, paused: bool, by: str | None = None) -> None:
        """Pause or resume ``job`` fleet-wide (every node's LISTEN gets a notice)."""
        await self._call("execute", sql.PAUSE, job, paused, by or self.node)

    async def register(self, hashes: Mapping[str, str]) -> list[Mapping[str, Any]]:
        """Upsert the fleet jobs' rows; returns each job's pause flag and whether another
        node (``other``) started with a different config for it (``differs``)."""
        rows = await self._call("fetch", sql.JOBS, list(hashes), list(hashes.values()), self.node)
        return [dict(r) for r in rows]

    async def paused(self, jobs: Sequence[str]) -> dict[str, bool]:
        return {job: paused for job, (paused, _) in (await self.flags(jobs)).items()}

    async def flags(self, jobs: Sequence[str]) -> dict[str, tuple[bool, int | None]]:
        """Each job's pause flag and its version (µs; None: never paused or resumed)."""
        rows = await self._call("fetch", sql.PAUSED, list(jobs))
        return {r["job"]: (r["paused"], version(r["paused_at"])) for r in rows}

    async def listen(
        self,
        notice: Callable[[str, bool, str, int | None], None],
        resync: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Pause notices to ``notice`` (taskd.fleet.notify.Listener)."""
        await self.listener.listen(notice, resync)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["Beat", "ClaimResult", "FleetDB", "FleetDown", "NodeTaken", "Swept"]
