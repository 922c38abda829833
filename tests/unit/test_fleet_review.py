"""Regressions of the fleet review (/work/notes/review-fleet.md, R1-R11), each against a real
PostgreSQL with real schedulers (the hosts of test_fleet_ledger): each test fails on the code
the review found the bug in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taskd.config.model import FleetConfig
from taskd.fleet import sql
from taskd.fleet.conn import FleetDown, from_ts, interval, to_ts
from taskd.fleet.db import FleetDB
from tests.dbservers import FLEET_PASSWORD, FLEET_USER, PgServer
from tests.fleetkit import fleet_config
from tests.unit.test_fleet_ledger import Host, _rows, _spec, _until, hosts, logs  # noqa: F401

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def events(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """test_fleet_ledger's ``logs``: the structlog events of the test."""
    return request.getfixturevalue("logs")  # type: ignore[no-any-return]


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> Callable[..., Awaitable[list[Host]]]:
    """test_fleet_ledger's ``hosts``: ``await fleet(n, **fleet_config)`` makes n hosts on a
    fresh fleet database; all stopped at the end."""
    return request.getfixturevalue("hosts")  # type: ignore[no-any-return]


@pytest.fixture
async def dbs(
    postgres: PgServer, tmp_path: Path
) -> AsyncIterator[tuple[FleetConfig, Callable[[str], Awaitable[FleetDB]]]]:
    """FleetDBs (each a node) on a fresh database; all closed at the end."""
    cfg = fleet_config(postgres, tmp_path, lease=30.0, sweep=1.0)
    made: list[FleetDB] = []

    async def make(node: str) -> FleetDB:
        db = FleetDB(cfg, node, "test")
        await db.open()
        made.append(db)
        return db

    yield cfg, make
    for db in made:
        await db.close()


class TestOverlapRace:
    """R1: overlap = "skip" holds fleet-wide when claims of two ticks race."""

    async def test_a_claim_that_waited_on_another_sees_it_running(self, dbs: Any) -> None:
        cfg, make = dbs
        h1, h2 = await make("h1"), await make("h2")
        await h1.register({"j": "x"})
        c1 = await asyncpg.connect(cfg.dsn, password=FLEET_PASSWORD)
        try:
            tx = c1.transaction()
            await tx.start()  # h1's claim, its transaction not yet committed
            now = time.time()
            r1 = await c1.fetchrow(sql.CLAIM, "j", to_ts(now), "s", "h1", "schedule",
                                   interval(60), interval(1), interval(30), True)  # fmt: skip
            assert r1["fence"] is not None
            t2 = asyncio.create_task(h2.claim("j", now + 0.5, "schedule", window=60,
                                              overlap_skip=True))  # fmt: skip
            for _ in range(1000):  # until h2's claim waits on h1's lock
                waiting = await h1.conn.require().fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.01)
            await tx.commit()
            r2 = await t2
        finally:
            await c1.close()
        assert r2.fence is None and r2.why == "overlap"
        running = await h1.conn.require().fetchval(
            "SELECT count(*) FROM taskd.claims WHERE job = 'j' AND state = 'running'"
        )
        assert running == 1


class TestFinishRefused:
    """R3: a finish the database refuses for its values is never taken as kept."""

    @pytest.mark.parametrize("bad", ["nan", "nul-result", "nul-error"])
    async def test_a_finish_with_values_jsonb_refuses_ends_the_tick_once(
        self, fleet: Any, events: list[dict[str, Any]], bad: str
    ) -> None:
        runs: list[int] = []

        async def func(ctx: Any) -> Any:
            runs.append(ctx.fence)
            if bad == "nan":
                return {"ratio": float("nan"), "n": 1}
            if bad == "nul-result":
                return {"text": "a\x00b"}
            raise ValueError("bad byte \x00 in input")

        h1, h2 = await fleet(2, max_takeovers=1)
        at = time.time() + 0.3
        for h in (h1, h2):
            await h.start(_spec(func, schedule="at", at=at, grace=30.0))

        async def ended() -> list[dict[str, Any]]:
            return [r for r in await _rows(h1) if r["state"] != "running"]

        deadline = time.monotonic() + 30
        while not await ended():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        (row,) = await _rows(h1)
        assert row["state"] == ("failed" if bad == "nul-error" else "succeeded")
        assert row["takeovers"] == 0 and len(runs) == 1  # ran once, never taken over
        if bad == "nan":
            assert row["result"] is not None and '"n": 1' in row["result"]
        await _until(lambda: not h1.fleet.held and not h2.fleet.held)


async def _nothing(ctx: Any) -> None:
    pass


class TestFinishRefusedForGood:
    """R3: a finish refused even as a bare failure keeps the claim held (heartbeating), so
    the tick is not run again elsewhere while this host lives."""

    async def test_the_claim_stays_held_and_no_host_reruns_the_tick(
        self, fleet: Any, events: list[dict[str, Any]]
    ) -> None:
        runs: list[int] = []

        async def func(ctx: Any) -> None:
            runs.append(ctx.fence)

        h1, h2 = await fleet(2)
        at = time.time() + 0.5
        await h1.start(_spec(func, schedule="at", at=at, grace=30.0))
        # Every finish refused (a constraint no ended row meets), for a reason that is not
        # a lost connection.
        await h1.fleet.db.conn.require().execute(
            "ALTER TABLE taskd.claims ADD CONSTRAINT never_ends CHECK (state = 'running')"
        )
        await h2.start(_spec(func, schedule="at", at=at, grace=30.0))
        await _until(lambda: any(e["event"] == "fleet_finish_failed" for e in events))
        await asyncio.sleep(4.5)  # past the lease (3 s): a released claim would be swept
        (row,) = await _rows(h1)
        assert (row["state"], row["takeovers"], len(runs)) == ("running", 0, 1)
        held = [c.fence for h in (h1, h2) for c in h.fleet.held.values()]
        assert held == [row["fence"]]  # still held by its owner, whichever won it
        await h1.fleet.db.conn.require().execute(
            "ALTER TABLE taskd.claims DROP CONSTRAINT never_ends"
        )


class TestLocalRefusal:
    """R5: a tick this node cannot run (stopping, broken here) goes back to the fleet
    unended, and a draining node takes over nothing."""

    async def _dead_claim(self, cfg: FleetConfig) -> FleetDB:
        dead = FleetDB(cfg, "dead", "test")
        await dead.open()
        await dead.register({"j": ""})
        got = await dead.claim("j", time.time(), "schedule", window=60, overlap_skip=True)
        assert got.fence is not None  # and "dead" never beats again
        return dead

    async def test_a_stopping_node_hands_a_takeover_back_and_another_runs_it(
        self, fleet: Any, events: list[dict[str, Any]]
    ) -> None:
        ran: list[str] = []

        def job_for(name: str) -> Callable[..., Any]:
            async def func(ctx: Any) -> None:
                ran.append(name)

            return func

        h1, h2 = await fleet(2, on_owner_lost="retry")
        dead = await self._dead_claim(h1.fleet.cfg)
        at = time.time() + 600  # the schedule plays no part: only the dead node's tick
        await h1.start(_spec(job_for("h1"), schedule="at", at=at, grace=30.0))
        h1.jobs.stop()  # its take_over answers "shutdown" from now on
        await _until(lambda: any(e["event"] == "fleet_handed_back" for e in events))
        await h2.start(_spec(job_for("h2"), schedule="at", at=at, grace=30.0))
        await _until(lambda: ran == ["h2"])
        await _until(lambda: not h2.fleet.held)
        (row,) = await _rows(h2)
        assert row["state"] == "succeeded" and row["owner"] == "h2"
        assert row["takeovers"] == 1  # h2's refusal was not counted
        await dead.close()

    async def test_a_draining_node_takes_nothing_over(self, fleet: Any) -> None:
        (h1,) = await fleet(1, on_owner_lost="retry")
        dead = await self._dead_claim(h1.fleet.cfg)
        await h1.start(_spec(_nothing, schedule="at", at=time.time() + 600))
        h1.fleet.drain()
        sweeps = h1.fleet.sweeps
        await asyncio.sleep(4.0)  # past the dead node's lease (3 s): sweeps would take it
        (row,) = await _rows(h1)
        assert row["owner"] == "dead" and row["state"] == "running"
        assert h1.fleet.sweeps == sweeps  # no sweep ran while draining
        await dead.close()


class TestListenAfterOutage:
    """R8b: a LISTEN connection that cannot be opened after an outage is the listener's
    own retry, never the database marked down again."""

    async def test_runs_go_on_while_the_listen_connection_cannot_open(
        self, fleet: Any, postgres: PgServer, events: list[dict[str, Any]]
    ) -> None:
        ran: list[int] = []

        async def func(ctx: Any) -> None:
            ran.append(ctx.fence)

        (h1,) = await fleet(1)
        await h1.start(_spec(func, every=0.5))
        await _until(lambda: len(ran) >= 1)
        # The pool's one connection is all the role may hold: LISTEN's cannot open.
        postgres.sql(f"ALTER ROLE {FLEET_USER} CONNECTION LIMIT 1", db="postgres")
        try:
            postgres.stop()
            # The pool learns of it first (the listener's own retry waits ~0.5 s, then sees
            # the database down and leaves it to the reconnect), so the pool's reconnect
            # gets the one connection and the reconnect's LISTEN is the one refused.
            with pytest.raises(FleetDown):
                await h1.fleet.db.heartbeat([])
            postgres.start()
            await _until(lambda: any(e["event"] == "fleet_db_up" for e in events))
            n = len(ran)
            await _until(lambda: len(ran) >= n + 4)
        finally:
            postgres.sql(f"ALTER ROLE {FLEET_USER} CONNECTION LIMIT -1", db="postgres")
        # The LISTEN refused was the listener's to retry. (The pool itself may still meet
        # the limit when it wants a second connection: a fleet_db_down of its own.)
        assert any(e["event"] == "fleet_listen_failed" for e in events)


def _off_grid(t: float) -> float:
    """A time near ``t`` whose float and whose timestamptz (whole µs) read back differ as a
    datetime: the owner's ctx.scheduled and a takeover's would differ by 1 µs."""
    while datetime.fromtimestamp(t, UTC) == datetime.fromtimestamp(from_ts(to_ts(t)), UTC):
        t += 0.1234567
    return t


class TestTakeoverTick:
    """R11: a takeover's ctx.scheduled is the original owner's, to the microsecond."""

    async def test_owner_and_takeover_see_the_same_scheduled(self, fleet: Any) -> None:
        seen: list[tuple[str, int, datetime]] = []

        def job_for(name: str) -> Callable[..., Any]:
            async def func(ctx: Any) -> None:
                seen.append((name, ctx.fence, ctx.scheduled))
                if name == "h1":
                    await asyncio.sleep(3600)  # until its claim is lost

            return func

        h1, h2 = await fleet(2)
        spec = dict(schedule="at", at=_off_grid(time.time() + 0.3), grace=30.0)
        await h1.start(_spec(job_for("h1"), **spec))
        await _until(lambda: bool(seen))
        await h2.start(_spec(job_for("h2"), **spec), run=False)  # it only sweeps
        # h1 dies: no more heartbeats (one could extend the lease ended below), lease over.
        for task in h1.fleet._tasks:
            if task.get_name() == "taskd-fleet-heartbeat":
                task.cancel()
        await h2.fleet.db.conn.require().execute(
            "UPDATE taskd.claims SET lease_until = now() - interval '1s' WHERE fence = $1",
            seen[0][1],
        )
        await _until(lambda: len(seen) >= 2)
        (n1, _, s1), (n2, _, s2) = seen
        assert (n1, n2) == ("h1", "h2") and s1 == s2


class TestSweepPaused:
    """R10: a takeover respects the fleet-wide pause, even on a node that missed it."""

    async def test_a_node_that_missed_the_pause_takes_nothing_over(self, fleet: Any) -> None:
        ran: list[int] = []

        async def func(ctx: Any) -> None:
            ran.append(ctx.fence)

        (h1,) = await fleet(1)
        dead = FleetDB(h1.fleet.cfg, "dead", "test")
        await dead.open()
        await dead.register({"j": ""})
        got = await dead.claim("j", time.time(), "schedule", window=60, overlap_skip=True)
        # Paused fleet-wide, its notice lost (as when h1's LISTEN connection is down).
        await dead.conn.require().execute("UPDATE taskd.jobs SET paused = true WHERE job = 'j'")
        await h1.start(_spec(func, schedule="at", at=time.time() + 600, grace=30.0))
        h1.fleet.flags["j"] = False
        h1.jobs.get("j").paused = False
        await _until(lambda: h1.fleet.sweeps >= 1)

        async def ended() -> bool:
            return (await _rows(h1))[0]["state"] != "running"

        deadline = time.monotonic() + 20
        while not await ended():  # the dead node's lease (3 s) runs out
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        (row,) = await _rows(h1)
        assert not ran
        assert (row["fence"], row["state"], row["owner"]) == (got.fence, "cancelled", "dead")
        await dead.close()


class TestPrune:
    """R9: retention never deletes the row of a tick that may still be claimed."""

    async def test_a_pruned_tick_is_not_claimed_again(
        self, fleet: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from taskd.fleet import loops

        monkeypatch.setattr(loops, "PRUNE_EVERY", 1)  # a retention pass at every sweep
        (h1,) = await fleet(1, claim_window=3600.0)
        h1.fleet.history_max_age = 1.0
        await h1.start(_spec(_nothing, schedule="at", at=time.time() + 600), run=False)
        db = h1.fleet.db
        tick = time.time() - 5  # a catch-up tick, claimable for claim_window (1 h)
        got = await db.claim("j", tick, "catchup", window=3600, overlap_skip=True)
        assert got.fence is not None
        manual = await db.claim_manual("j", "manual", overlap_skip=False)
        for fence in (got.fence, manual.fence):
            assert fence is not None
            await db.finish(fence, "j", "succeeded", attempts=1, duration=0.1, error=None,
                            result_json=None)  # fmt: skip
        await asyncio.sleep(1.5)  # older than history_max_age now
        sweeps = h1.fleet.sweeps
        await _until(lambda: h1.fleet.sweeps >= sweeps + 3)
        again = await db.claim("j", tick, "catchup", window=3600, overlap_skip=True)
        assert (again.fence, again.why) == (None, "taken")
        # Retention still works: the manual run's row (its tick never claimed again) went.
        assert [r["fence"] for r in await _rows(h1)] == [got.fence]


class TestPauseOrder:
    """R7: a claim's 'paused' answer older than a resume already applied is ignored."""

    async def test_a_stale_paused_answer_does_not_undo_a_newer_resume(self, fleet: Any) -> None:
        from taskd.ledger import NotClaimed
        from taskd.run.events import Cause
        from taskd.run.runner import RunInfo

        h1, h2 = await fleet(2)
        for h in (h1, h2):
            await h.start(_spec(_nothing, every=0.2), run=False)
        claim = h2.fleet.db.claim

        async def late_reply(*a: Any, **kw: Any) -> Any:
            got = await claim(*a, **kw)
            if got.why == "paused":
                # Resumed right after the claim read the flag; the resume's notice reaches
                # h2 before the claim's reply does (two sockets, no set order).
                await h1.fleet.db.set_paused("j", False)
                await _until(lambda: h2.fleet.flags.get("j") is False)
            return got

        h2.fleet.db.claim = late_reply  # type: ignore[method-assign]
        await h1.fleet.db.set_paused("j", True)
        info = RunInfo("r1", "j", time.time(), time.time(), Cause.SCHEDULE)
        with pytest.raises(NotClaimed):
            await h2.fleet.claim(info)
        await asyncio.sleep(0.3)  # the reply's flag is applied by a call_soon
        assert await h1.fleet.db.paused(["j"]) == {"j": False}
        assert h2.fleet.flags["j"] is False and not h2.jobs.get("j").paused


class TestSuspend:
    """R6: a claim whose local deadline passed while the host slept is let go on waking."""

    async def test_a_run_past_its_deadline_after_a_suspend_is_cancelled(
        self, fleet: Any, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
    ) -> None:
        started: list[int] = []

        async def func(ctx: Any) -> None:
            started.append(ctx.fence)
            await asyncio.sleep(3600)

        (h1,) = await fleet(1, lease=30.0)
        await h1.start(_spec(func, schedule="at", at=time.time() + 0.3, grace=30.0))
        await _until(lambda: bool(started))
        for task in h1.fleet._tasks:  # no heartbeat: only the local deadline decides
            if task.get_name() == "taskd-fleet-heartbeat":
                task.cancel()
        # The host "wakes" from a 40 s suspend: CLOCK_BOOTTIME ran on, the loop's
        # monotonic clock (its timers) did not. A real suspend cannot be had in a test.
        real = time.clock_gettime
        monkeypatch.setattr(
            time, "clock_gettime",
            lambda clk: real(clk) + (40.0 if clk == time.CLOCK_BOOTTIME else 0.0),
        )  # fmt: skip
        await _until(lambda: any(e["event"] == "fleet_claim_lost" for e in events))
        (lost,) = [e for e in events if e["event"] == "fleet_claim_lost"]
        assert lost["fence"] == started[0] and "no heartbeat got through" in lost["why"]


class TestFleetStateAtomic:
    """R4: ctx.state.locked() is one fleet-wide critical section, and a live claim's write
    is never refused for another claim's fence."""

    async def _claims(self, make: Any) -> tuple[FleetDB, FleetDB, int, int]:
        h1, h2 = await make("h1"), await make("h2")
        await h1.register({"a": "x", "b": "y"})
        now = time.time()
        ca = await h1.claim("a", now, "schedule", window=60, overlap_skip=True)
        cb = await h2.claim("b", now, "schedule", window=60, overlap_skip=True)
        assert ca.fence is not None and cb.fence is not None and ca.fence < cb.fence
        return h1, h2, ca.fence, cb.fence

    async def test_two_live_runs_increment_without_a_lost_update(self, dbs: Any) -> None:
        from taskd.fleet.state import FleetState

        h1, h2, fa, fb = await self._claims(dbs[1])

        async def incr(st: FleetState, pause: float) -> None:
            async with st.locked() as v:
                n = v.get("n", 0)
                await asyncio.sleep(pause)  # the job awaits something inside the block
                v["n"] = n + 1

        await asyncio.gather(incr(FleetState(h1, "a", fa), 0.2), incr(FleetState(h2, "b", fb), 0.1))
        assert (await h1.get_state())["n"] == 2

    async def test_a_live_claim_writes_a_key_a_newer_fence_wrote(self, dbs: Any) -> None:
        from taskd.fleet.state import FleetState

        h1, h2, fa, fb = await self._claims(dbs[1])
        async with FleetState(h2, "b", fb).locked() as v:
            v["k"] = "from b"
        async with FleetState(h1, "a", fa).locked() as v:  # fa < fb, both live: kept
            v["k"] = "from a"
        assert (await h1.get_state())["k"] == "from a"

    async def test_a_refusal_says_why(self, dbs: Any) -> None:
        from taskd.fleet.state import FencedOut, FleetState

        h1, _, fa, _ = await self._claims(dbs[1])
        await h1.finish(fa, "a", "succeeded", attempts=1, duration=0.1, error=None,
                        result_json=None)  # fmt: skip
        with pytest.raises(FencedOut, match="its claim has ended") as got:
            async with FleetState(h1, "a", fa).locked() as v:
                v["k"] = 1
        assert "took it over" not in str(got.value)


class TestDrainCancelled:
    """R5: a run the drain cancels goes back to the fleet, for another node to run."""

    async def test_a_run_cancelled_by_the_stop_is_run_elsewhere(
        self, fleet: Any, events: list[dict[str, Any]]
    ) -> None:
        started: list[str] = []

        def job_for(name: str) -> Callable[..., Any]:
            async def func(ctx: Any) -> None:
                started.append(name)
                if name == "h1":
                    await asyncio.sleep(3600)  # still going when its daemon stops

            return func

        h1, h2 = await fleet(2, on_owner_lost="retry")
        spec = dict(schedule="at", at=time.time() + 0.3, grace=30.0)
        await h1.start(_spec(job_for("h1"), **spec))
        await _until(lambda: started == ["h1"])
        await h2.start(_spec(job_for("h2"), **spec), run=False)  # it only sweeps
        h1.fleet.drain()  # the daemon's stop, then its drain cancels the run
        await h1.halt()
        await _until(lambda: started == ["h1", "h2"])
        await _until(lambda: not h2.fleet.held)
        (row,) = await _rows(h2)
        assert (row["owner"], row["state"], row["lost_owners"]) == ("h2", "succeeded", ["h1"])
