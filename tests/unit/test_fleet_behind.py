"""A fleet host behind on its finishes, against a real PostgreSQL (the hosts of
test_fleet_ledger): it spends no round trip on a claim that must lose, and finishes queued
together are written in one statement, each with its own verdict."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from taskd.fleet import sql
from taskd.fleet.held import Held, boottime
from tests.unit.test_fleet_ledger import _rows, _spec, _until, hosts, logs  # noqa: F401

pytestmark = pytest.mark.timeout(90)


class TestBehind:
    async def test_a_tick_behind_a_queued_finish_is_skipped_without_a_claim(
        self,
        hosts: Any,  # noqa: F811
        logs: list[dict[str, Any]],  # noqa: F811
    ) -> None:
        # The writer stalls on the first finish (a database slow to take it): the job's row
        # stays running, so every later tick of this overlap="skip" job could only be
        # refused as overlap by the database. They are skipped here, with no claim sent.
        runs: list[float] = []

        async def func(ctx: Any) -> None:
            runs.append(ctx.scheduled.timestamp())

        (h,) = await hosts(1)
        stalled = asyncio.Event()
        go = asyncio.Event()
        finish = h.fleet.db.finish

        async def slow_finish(*args: Any, **kw: Any) -> Any:
            stalled.set()
            await go.wait()
            return await finish(*args, **kw)

        h.fleet.db.finish = slow_finish  # type: ignore[method-assign]
        claims = 0
        claim = h.fleet.db.claim

        async def counted(*args: Any, **kw: Any) -> Any:
            nonlocal claims
            claims += 1
            return await claim(*args, **kw)

        h.fleet.db.claim = counted  # type: ignore[method-assign]
        await h.start(_spec(func, every=0.1, overlap="skip"))
        await asyncio.wait_for(stalled.wait(), 10)
        skipped = [e for e in logs if e["event"] == "not_claimed"]
        await _until(
            lambda: len([e for e in logs if e["event"] == "not_claimed"]) >= len(skipped) + 5
        )
        behind = [e for e in logs if e["event"] == "not_claimed"][len(skipped) :]
        assert {e["reason"] for e in behind} == {"overlap"}
        assert all("not written yet" in e["detail"] for e in behind)
        assert claims == 1 and len(runs) == 1  # the one run; no claim sent since
        go.set()
        await _until(lambda: len(runs) >= 3)  # written: claims go out again
        await h.halt()
        assert claims >= 3
        rows = await _rows(h)
        assert [r["state"] for r in rows] == ["succeeded"] * len(rows)
        assert len(rows) == len(runs)


class TestBatch:
    async def test_queued_finishes_go_in_one_statement_each_with_its_verdict(
        self,
        hosts: Any,  # noqa: F811
        logs: list[dict[str, Any]],  # noqa: F811
    ) -> None:
        async def func(ctx: Any) -> None:
            pass

        (h,) = await hosts(1)
        await h.start(_spec(func, every=3600.0, overlap="allow"), run=False)
        db = h.fleet.db
        sent: list[str] = []
        call = db._call

        async def spy(how: str, query: str, *args: Any) -> Any:
            sent.append(query)
            return await call(how, query, *args)

        db._call = spy  # type: ignore[method-assign]

        ticks = [float(int(time.time())) - 60]

        async def queued(*values: tuple[Any, ...], stale: int | None = None) -> list[int]:
            """Claim a tick per finish (the ``stale`` one then taken over by another node),
            and queue all the finishes at once."""
            helds = []
            for _ in values:
                ticks.append(ticks[-1] + 1)
                got = await db.claim("j", ticks[-1], "schedule", window=600.0, overlap_skip=False)
                assert got.fence is not None
                helds.append(Held("j", got.fence, got.tick, f"r{got.fence}", boottime() + 60))
            if stale is not None:
                await db.conn.require().execute(
                    "UPDATE taskd.claims SET owner = 'other' WHERE fence = $1", helds[stale].fence
                )  # fmt: skip
            for held, v in zip(helds, values, strict=True):
                h.fleet.held[held.fence] = held
                held.ended = True
                h.fleet.queue(held, None, v)
            await asyncio.wait_for(h.fleet.writes.join(), 10)
            return [held.fence for held in helds]

        # Good rows only: one statement for all, no FINISH per row.
        sent.clear()
        f = await queued(
            ("succeeded", 1, 0.1, None, '{"n": 1}'),
            ("failed", 2, 0.2, "boom", None),
            ("succeeded", 1, 0.3, None, '{"n": 3}'),
        )
        assert sent.count(sql.FINISH_MANY) == 1 and sent.count(sql.FINISH) == 0
        rows = {r["fence"]: r for r in await _rows(h)}
        assert [rows[x]["state"] for x in f] == ["succeeded", "failed", "succeeded"]
        value = await db.conn.require().fetchrow("SELECT value, fence FROM taskd.state")
        assert (value["value"], value["fence"]) == ('{"n": 3}', f[2])  # the newer fence's
        assert not [e for e in logs if e["event"] in ("fleet_result_discarded",
                                                     "fenced_write_refused")]  # fmt: skip

        # One value the database refuses (a NUL in text) and one claim taken over: the batch
        # fails, each row is written alone, and only their own verdicts differ.
        sent.clear()
        f = await queued(
            ("succeeded", 1, 0.1, None, '{"n": 4}'),
            ("failed", 1, 0.1, "bad\x00nul", None),
            ("succeeded", 1, 0.1, None, None),
            stale=2,
        )
        assert sent.count(sql.FINISH_MANY) == 1  # refused: nothing kept from it
        rows = {r["fence"]: r for r in await _rows(h)}
        assert rows[f[0]]["state"] == "succeeded"
        errors = await db.conn.require().fetchval(
            "SELECT error FROM taskd.claims WHERE fence = $1", f[1]
        )  # fmt: skip
        assert (rows[f[1]]["state"], errors) == ("failed", "badnul")  # the cleaned retry
        assert (rows[f[2]]["state"], rows[f[2]]["owner"]) == ("running", "other")
        discarded = [e for e in logs if e["event"] == "fleet_result_discarded"]
        assert [(e["fence"], e["why"]) for e in discarded] == [
            (f[2], f"fence {f[2]} was taken over")
        ]
        # And a stale row alone does not fail a batch: it is refused in it, the rest kept.
        sent.clear()
        f = await queued(("succeeded", 1, 0.1, None, None), ("failed", 1, 0.1, "x", None),
                         stale=0)  # fmt: skip
        assert sent.count(sql.FINISH_MANY) == 1 and sent.count(sql.FINISH) == 0
        rows = {r["fence"]: r for r in await _rows(h)}
        assert (rows[f[0]]["state"], rows[f[1]]["state"]) == ("running", "failed")
        discarded = [e for e in logs if e["event"] == "fleet_result_discarded"]
        assert discarded[-1]["fence"] == f[0]


class TestPool:
    async def test_claims_waiting_on_the_database_leave_a_connection_to_finishes(
        self,
        hosts: Any,  # noqa: F811
    ) -> None:
        async def func(ctx: Any) -> None:
            pass

        (h,) = await hosts(1, lease=30.0)
        await h.start(
            _spec(func, "j", every=3600.0, overlap="allow"),
            _spec(func, "k", every=3600.0, overlap="allow"),
            run=False,
        )
        db = h.fleet.db
        tick = float(int(time.time())) - 5
        won = await db.claim("k", tick, "schedule", window=600.0, overlap_skip=False)
        assert won.fence is not None
        # Another session holds job j's row: every claim of j waits on it in the database.
        other = await asyncpg.connect(**(await db.conn.connect_kwargs("test")))
        try:
            tx = other.transaction()
            await tx.start()
            await other.execute("SELECT 1 FROM taskd.jobs WHERE job = 'j' FOR UPDATE")
            claims = [
                asyncio.create_task(
                    db.claim("j", tick - i, "schedule", window=600.0, overlap_skip=False)
                )
                for i in range(8)
            ]
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            for _ in range(1000):  # until 3 claims wait on the lock (20 s at most)
                await other.execute("SELECT pg_stat_clear_snapshot()")  # in a transaction
                if await other.fetchval(waiting) >= 3:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the claims never reached the database")
            # The finish gets a connection while every claim still waits (without the
            # reserved one it would wait for a claim to end: none can before the commit).
            ended, _ = await db.finish(
                won.fence, "k", "succeeded", attempts=1, duration=0.1, error=None,
                result_json=None,
            )  # fmt: skip
            assert ended
            assert not any(t.done() for t in claims)
            await tx.commit()
            got = await asyncio.gather(*claims)
            assert all(g.fence is not None for g in got)  # each its own tick
        finally:
            await other.close()
