"""The fleet's SQL (taskd.fleet.sql/schema/db) against a real PostgreSQL 15.

Races are made deterministic with two connections: one holds a transaction open, the test
waits until the other's backend is seen waiting on a lock (pg_stat_activity), then lets go."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taskd.config.model import FleetConfig
from taskd.fleet import schema, sql
from taskd.fleet.conn import FleetDown, interval, to_ts
from taskd.fleet.db import EARLY_SLACK, FleetDB, NodeTaken
from tests.dbservers import FLEET_PASSWORD, PgServer
from tests.fleetkit import fleet_config

pytestmark = pytest.mark.timeout(60)

LEASE = 30.0


@pytest.fixture
def fleet_cfg(postgres: PgServer, tmp_path: Path) -> FleetConfig:
    """A [fleet] table for a fresh database."""
    return fleet_config(postgres, tmp_path, lease=LEASE, sweep=1.0)


@pytest.fixture
async def opened(fleet_cfg: FleetConfig) -> AsyncIterator[Callable[..., Awaitable[FleetDB]]]:
    """Open FleetDBs (each a node) on the test's database; all closed at the end."""
    dbs: list[FleetDB] = []

    async def make(node: str, **kw: Any) -> FleetDB:
        cfg = FleetConfig(**{**_fields(fleet_cfg), **kw})
        db = FleetDB(cfg, node, "test")
        await db.open()
        dbs.append(db)
        return db

    yield make
    for db in dbs:
        await db.close()


@pytest.fixture
async def raw(fleet_cfg: FleetConfig) -> AsyncIterator[Callable[[], Awaitable[asyncpg.Connection]]]:
    """Plain connections as the fleet role, for transactions the test holds open."""
    conns: list[asyncpg.Connection] = []

    async def make() -> asyncpg.Connection:
        c = await asyncpg.connect(fleet_cfg.dsn, password=FLEET_PASSWORD, timeout=10)
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.terminate()


def _fields(cfg: FleetConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in cfg.__slots__}


def _claim_args(
    job: str, tick: float | None, node: str, *, window: float = 60.0
) -> tuple[Any, ...]:
    ts = None if tick is None else to_ts(tick)
    return (job, ts, "s", node, "schedule", interval(window), interval(EARLY_SLACK),
            interval(LEASE), False)  # fmt: skip


async def _waits_on_lock(c: asyncpg.Connection, pid: int) -> None:
    """Until backend ``pid`` is waiting on a lock (fails after 10 s)."""
    for _ in range(1000):
        got = await c.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
        if got == "Lock":
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"backend {pid} never waited on a lock")


async def _expire(c: asyncpg.Connection, fence: int) -> None:
    await c.execute(
        "UPDATE taskd.claims SET lease_until = now() - interval '1s' WHERE fence = $1", fence
    )


class TestSchema:
    """Schema v1 as migrations, under an advisory lock, refusing a newer database."""

    async def test_creates_v1_then_is_a_no_op(self, raw: Any) -> None:
        c = await raw()
        assert await schema.version(c) == 0
        assert await schema.migrate(c) == (0, schema.VERSION)
        assert await schema.migrate(c) == (schema.VERSION, schema.VERSION)
        tables = {r[0] for r in await c.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'taskd'")}  # fmt: skip
        assert tables == {"meta", "nodes", "jobs", "claims", "state"}
        cols = {r[0] for r in await c.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'")}  # fmt: skip
        assert "spec_hash" in cols

    async def test_newer_schema_is_refused(self, raw: Any) -> None:
        c = await raw()
        await schema.migrate(c)
        await c.execute("UPDATE taskd.meta SET schema_version = 99")
        with pytest.raises(
            schema.SchemaTooNew, match=r"schema v99 is newer than this taskd \(v2\)"
        ):
            await schema.migrate(c)

    async def test_older_schema_migrates_in_one_transaction(self, raw: Any) -> None:
        c = await raw()
        await schema.migrate(c)
        v2 = (*schema.MIGRATIONS, ("ALTER TABLE taskd.jobs ADD COLUMN note text",))
        bad = (*v2, ("ALTER TABLE taskd.nodes ADD COLUMN x int", "SELECT no_such_fn()"))
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await schema.migrate(c, bad)
        # Nothing of the failed run stayed: not v2's column, not v3's.
        assert await schema.version(c) == schema.VERSION
        assert await c.fetchval("SELECT count(*) FROM information_schema.columns "
                                "WHERE table_name = 'jobs' AND column_name = 'note'") == 0  # fmt: skip
        assert await schema.migrate(c, v2) == (schema.VERSION, schema.VERSION + 1)
        await c.execute("SELECT note FROM taskd.jobs")

    async def test_concurrent_starts_migrate_once(self, raw: Any) -> None:
        conns = [await raw() for _ in range(3)]
        got = await asyncio.gather(*(schema.migrate(c) for c in conns))
        assert sorted(found for found, _ in got) == [0, schema.VERSION, schema.VERSION]


class TestClaim:
    """One claim per tick; each refusal reason."""

    async def test_win_then_taken(self, opened: Any) -> None:
        h1, h2 = await opened("h1"), await opened("h2")
        await h1.register({"j": "hash"})
        tick = time.time()
        won = await h1.claim("j", tick, "schedule", window=60, overlap_skip=False)
        assert won.fence is not None and won.why is None
        assert won.tick == pytest.approx(tick, abs=1e-6)
        assert won.lease_until == pytest.approx(won.db_now + LEASE, abs=0.5)
        lost = await h2.claim("j", tick, "schedule", window=60, overlap_skip=False)
        assert (lost.fence, lost.why, lost.holder) == (None, "taken", "h1")
        # A manual run of the same instant is another kind: its own row.
        m = await h2.claim_manual("j", "manual", overlap_skip=False)
        assert m.fence is not None and m.fence > won.fence
        assert m.tick == pytest.approx(m.db_now, abs=1e-3)

    async def test_refusals(self, opened: Any) -> None:
        h1 = await opened("h1")
        await h1.register({"j": "x"})
        now = time.time()
        early = await h1.claim("j", now + 5, "schedule", window=60, overlap_skip=False)
        assert early.why == "early" and early.fence is None
        late = await h1.claim("j", now - 10, "schedule", window=5, overlap_skip=False)
        assert late.why == "late"
        first = await h1.claim("j", now, "schedule", window=60, overlap_skip=True)
        assert first.fence is not None
        over = await h1.claim("j", now - 1, "schedule", window=60, overlap_skip=True)
        assert over.why == "overlap"
        assert (await h1.claim_manual("j", "manual", overlap_skip=True)).why == "overlap"
        # overlap = "allow": the running claim does not matter.
        assert (await h1.claim("j", now - 1, "x", window=60, overlap_skip=False)).fence
        await h1.set_paused("j", True)
        paused = await h1.claim("j", now - 2, "schedule", window=60, overlap_skip=False)
        assert paused.why == "paused"
        assert (await h1.claim_manual("j", "manual", overlap_skip=False)).why == "paused"

    async def test_unknown_job_is_registered(self, opened: Any) -> None:
        h1 = await opened("h1")
        got = await h1.claim("new", time.time(), "schedule", window=60, overlap_skip=False)
        assert got.fence is not None

    async def test_open_claim_blocks_the_second(self, opened: Any, raw: Any) -> None:
        await (await opened("h0")).register({"j": "x"})
        a, b, watch = await raw(), await raw(), await raw()
        tick = time.time()
        tx = a.transaction()
        await tx.start()
        row = await a.fetchrow(sql.CLAIM, *_claim_args("j", tick, "h1"))
        assert row["fence"] is not None
        second = asyncio.ensure_future(b.fetchrow(sql.CLAIM, *_claim_args("j", tick, "h2")))
        await _waits_on_lock(watch, b.get_server_pid())
        assert not second.done()
        await tx.commit()
        got = await second
        # holder is for information only: the winner's row is not in the loser's snapshot,
        # taken before it waited.
        assert (got["fence"], got["why"]) == (None, "taken")

    async def test_three_racing_connections_200_ticks(self, opened: Any) -> None:
        hosts = [await opened(f"h{i}") for i in range(3)]
        await hosts[0].register({"race": "x"})
        base = time.time() - 25
        ticks = [base + 0.1 * i for i in range(200)]
        wins = {h.node: 0 for h in hosts}

        async def host(db: FleetDB) -> None:
            for t in ticks:
                r = await db.claim("race", t, "schedule", window=60, overlap_skip=False)
                wins[db.node] += r.fence is not None

        await asyncio.gather(*(host(h) for h in hosts))
        c = hosts[0].conn.require()
        n, distinct = await c.fetchrow(
            "SELECT count(*), count(DISTINCT tick) FROM taskd.claims WHERE job = 'race'"
        )
        assert (n, distinct, sum(wins.values())) == (200, 200, 200)


class TestLeases:
    """Heartbeat, sweep (SKIP LOCKED, retry or abandon) and fenced writes."""

    async def _claimed(self, db: FleetDB, job: str = "j", ago: float = 0.0) -> int:
        await db.register({job: "x"})
        got = await db.claim(job, time.time() - ago, "schedule", window=60, overlap_skip=False)
        assert got.fence is not None
        return got.fence

    async def test_heartbeat_keeps_only_own_live_fences(self, opened: Any) -> None:
        h1, h2 = await opened("h1"), await opened("h2")
        f = await self._claimed(h1)
        beat = await h1.heartbeat([f, 999_999])
        assert beat.kept == {f}
        assert abs(beat.offset) < 1.0  # one clock here: the measure is near zero
        assert (await h2.heartbeat([f])).kept == frozenset()  # not h2's
        nodes = await h1.conn.require().fetch("SELECT node, pid FROM taskd.nodes ORDER BY node")
        assert [tuple(r) for r in nodes] == [("h1", h1.pid), ("h2", h2.pid)]

    async def test_sweep_takes_over_with_a_new_fence(self, opened: Any, raw: Any) -> None:
        h1, h2 = await opened("h1"), await opened("h2")
        f1 = await self._claimed(h1)
        assert await h2.sweep(["j"]) == []  # live: not swept
        await _expire(await raw(), f1)
        (took,) = await h2.sweep(["j"])
        assert took.state == "running" and took.fence > f1 and took.lost_owners == ("h1",)
        assert (await h1.heartbeat([f1])).kept == frozenset()  # the old owner learns it
        assert await h1.finish(f1, "j", "succeeded", attempts=1, duration=0.1, error=None,
                               result_json="1", result_key="j") == (False, False)  # fmt: skip
        assert await h2.finish(took.fence, "j", "succeeded", attempts=1, duration=0.1,
                               error=None, result_json="2", result_key="j") == (True, True)  # fmt: skip
        row = await h1.conn.require().fetchrow("SELECT * FROM taskd.claims WHERE job = 'j'")
        assert (row["owner"], row["state"], row["takeovers"], row["result"]) == (
            "h2", "succeeded", 1, "2")  # fmt: skip
        assert await h1.get_state() == {"j": 2}

    async def test_sweep_skips_a_row_a_heartbeat_holds(self, opened: Any, raw: Any) -> None:
        h1, h2 = await opened("h1"), await opened("h2")
        f1 = await self._claimed(h1)
        a = await raw()
        await _expire(a, f1)
        tx = a.transaction()
        await tx.start()
        kept = await a.fetchrow(sql.HEARTBEAT, "h1", [f1], interval(LEASE), 1, "b", "v")
        assert list(kept["kept"]) == [f1]
        assert await h2.sweep(["j"]) == []  # skipped, not waited for
        await tx.commit()
        assert await h2.sweep(["j"]) == []  # and now live again

    async def test_abandon_and_limits(self, opened: Any, raw: Any) -> None:
        h1 = await opened("h1")
        h2 = await opened("h2", on_owner_lost="abandon")
        f1 = await self._claimed(h1)
        await _expire(await raw(), f1)
        (gone,) = await h2.sweep(["j"])
        assert (gone.state, gone.fence) == ("abandoned", f1)
        # retry, but the tick is older than claim_window: abandoned too.
        h3 = await opened("h3", claim_window=5.0)
        f = await self._claimed(h1, "old", ago=20)
        await _expire(await raw(), f)
        assert [s.state for s in await h3.sweep(["old"])] == ["abandoned"]
        # retry, but taken over max_takeovers times already.
        h4 = await opened("h4", max_takeovers=1)
        f = await self._claimed(h1, "k")
        c = await raw()
        await _expire(c, f)
        (s,) = await h4.sweep(["k"])
        assert s.state == "running"
        await _expire(c, s.fence)
        assert [x.state for x in await h4.sweep(["k"])] == ["abandoned"]

    async def test_fenced_write_waits_for_a_sweep(self, opened: Any, raw: Any) -> None:
        h1 = await opened("h1")
        f1 = await self._claimed(h1)
        w, a, watch = await raw(), await raw(), await raw()
        # The writer's transaction starts while the lease holds (now() is fixed at its
        # start); then the lease ends, and the sweep (a later now()) takes the row over.
        wtx = w.transaction()
        await wtx.start()
        await w.fetchval("SELECT now()")
        await asyncio.sleep(0.01)
        await a.execute(
            "UPDATE taskd.claims SET lease_until = clock_timestamp() WHERE fence = $1", f1
        )
        await asyncio.sleep(0.01)
        tx = a.transaction()
        await tx.start()
        (took,) = await a.fetch(sql.SWEEP, "h2", ["j"], True, interval(LEASE),
                                interval(3600), 10, 3, [])  # fmt: skip
        assert took["fence"] > f1
        # The writer still sees its claim live, so it must wait for the sweep's row lock.
        put = asyncio.ensure_future(w.fetchval(sql.PUT_STATE, "k", '"stale"', f1, "h1", "j"))
        await _waits_on_lock(watch, w.get_server_pid())
        assert not put.done()
        await tx.commit()
        assert await put is None  # it saw the takeover: nothing written
        await wtx.commit()
        h2 = await opened("h2")
        assert await h2.put_state(took["fence"], "j", {"k": "new"}) is True
        assert await h1.get_state() == {"k": "new"}

    async def test_newer_fence_wins_the_key(self, opened: Any) -> None:
        h1 = await opened("h1")
        await h1.register({"j": "x"})
        now = time.time()
        old = await h1.claim("j", now - 1, "s", window=60, overlap_skip=False)
        new = await h1.claim("j", now, "s", window=60, overlap_skip=False)
        assert old.fence and new.fence and new.fence > old.fence
        assert await h1.put_state(new.fence, "j", {"k": 2, "n": 1})
        # Both claims are live; the older may not write over the newer's key, and none of
        # its keys stay (all or none).
        assert await h1.put_state(old.fence, "j", {"n": 9, "k": 1}) is False
        assert await h1.get_state() == {"k": 2, "n": 1}
        # Deletes are fenced alike: not a key a newer fence wrote; yes with the newest.
        assert await h1.put_state(old.fence, "j", {}, ["k"]) is False
        assert await h1.put_state(new.fence, "j", {}, ["n", "never-there"]) is True
        assert await h1.get_state() == {"k": 2}
        # A fence from another job's claim is refused too.
        await h1.register({"other": "x"})
        assert await h1.put_state(new.fence, "other", {"k": 3}) is False

    async def test_prune_ended_rows(self, opened: Any, raw: Any) -> None:
        h1 = await opened("h1")
        f = await self._claimed(h1)
        live = await self._claimed(h1, ago=1)
        assert (await h1.finish(f, "j", "failed", attempts=2, duration=1.0, error="E: x",
                                result_json=None))[0]  # fmt: skip
        await (await raw()).execute(
            "UPDATE taskd.claims SET ended_at = now() - interval '2 days' WHERE fence = $1", f
        )
        assert await h1.prune(86400, claimable=0) == 1  # its tick: no longer claimable
        left = await h1.conn.require().fetch("SELECT fence FROM taskd.claims")
        assert [r[0] for r in left] == [live]


class TestNodesAndNotices:
    """The node-name check, fleet-wide pause notices, config hashes, the database down."""

    async def test_second_live_node_of_one_name_is_refused(
        self, opened: Any, raw: Any, fleet_cfg: FleetConfig
    ) -> None:
        await opened("h1")
        twin = FleetDB(fleet_cfg, "h1")
        twin.pid, twin.boot_id = 1, "another-host"
        with pytest.raises(NodeTaken, match="node 'h1' is in use by another live taskd"):
            await twin.open()
        await twin.close()
        # Our own restart on this host (same boot id, the old pid gone) is no conflict.
        await (await raw()).execute("UPDATE taskd.nodes SET pid = $1", 2**22 + 7)
        again = FleetDB(fleet_cfg, "h1")
        await again.open()
        await again.close()

    async def test_pause_notice_reaches_other_nodes(self, opened: Any) -> None:
        h1, h2 = await opened("h1"), await opened("h2")
        await h1.register({"j": "x"})
        got: asyncio.Queue[tuple[str, bool, str, int | None]] = asyncio.Queue()
        await h2.listen(lambda *n: got.put_nowait(n))
        await h1.set_paused("j", True)
        *paused, v1 = await asyncio.wait_for(got.get(), 10)
        assert paused == ["j", True, "h1"]
        assert await h2.flags(["j"]) == {"j": (True, v1)}  # the notice's version is the row's
        await h1.set_paused("j", False, by="ops")
        *resumed, v2 = await asyncio.wait_for(got.get(), 10)
        assert resumed == ["j", False, "ops"]
        assert v1 is not None and v2 is not None and v2 > v1

    async def test_a_lost_listen_connection_comes_back_and_resyncs(
        self, opened: Any, postgres: PgServer
    ) -> None:
        h1, h2 = await opened("h1"), await opened("h2")
        await h1.register({"j": "x"})
        got: asyncio.Queue[tuple[str, bool, str, int | None]] = asyncio.Queue()
        resynced: asyncio.Queue[None] = asyncio.Queue()

        async def resync() -> None:
            resynced.put_nowait(None)

        await h2.listen(lambda *n: got.put_nowait(n), resync)
        (pid,) = [r[0] for r in postgres.connections("taskd-listen:h2")]
        postgres.sql("SELECT pg_terminate_backend($1)", pid, db="postgres")
        await asyncio.wait_for(resynced.get(), 20)  # listening again, flags re-read
        assert h2.state == "up"  # a lost LISTEN alone is no lost database
        await h1.set_paused("j", True)
        assert (await asyncio.wait_for(got.get(), 10))[:3] == ("j", True, "h1")

    async def test_config_hash_differs(self, opened: Any) -> None:
        h1, h2 = await opened("h1"), await opened("h2")
        assert [r["differs"] for r in await h1.register({"j": "a", "k": "b"})] == [False] * 2
        rows = {r["job"]: r for r in await h2.register({"j": "a", "k": "c"})}
        assert (rows["j"]["differs"], rows["k"]["differs"], rows["k"]["other"]) == (
            False, True, "h1")  # fmt: skip

    async def test_database_down_fails_fast_and_comes_back(
        self, opened: Any, postgres: PgServer
    ) -> None:
        h1 = await opened("h1")
        await h1.register({"j": "x"})
        postgres.stop()
        with pytest.raises(FleetDown):
            await h1.claim("j", time.time(), "s", window=60, overlap_skip=False)
        assert h1.state in ("down", "reconnecting")
        # Down: no round trip at all, the answer is at once.
        with pytest.raises(FleetDown, match="fleet database unreachable"):
            await h1.claim("j", time.time(), "s", window=60, overlap_skip=False)
        postgres.start()
        for _ in range(600):
            if h1.state == "up":
                break
            await asyncio.sleep(0.05)
        assert h1.state == "up"
        got = await h1.claim("j", time.time(), "s", window=60, overlap_skip=False)
        assert got.fence is not None
