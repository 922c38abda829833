"""FleetLedger against a real PostgreSQL, with real schedulers (JobSet + ScheduledJob) for two
or three hosts in one loop: each tick runs once in the fleet, a lost claim cancels its run, a
sweep takes over and runs it here, a pause reaches every host, the database down skips
ticks at once and its return catches up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from taskd.config.model import FleetConfig, JobConfig
from taskd.fleet.db import FleetDB
from taskd.fleet.ledger import FleetLedger
from taskd.jobspec import JobSpec, make_trigger
from taskd.ledger import LocalLedger
from taskd.plugin.jobtype import JobType
from taskd.plugin.manager import PluginHost
from taskd.run.events import Outcome
from taskd.run.runtime import Runtime
from taskd.schedule.job import ScheduledJob
from taskd.schedule.jobset import JobSet
from taskd.state.shared import SharedState
from taskd.state.store import StateStore
from tests.dbservers import PgServer
from tests.fleetkit import fleet_config

pytestmark = pytest.mark.timeout(90)


class Host:
    """One taskd host: its own store, runtime, scheduler and FleetLedger."""

    def __init__(self, name: str, cfg: FleetConfig, state: Path) -> None:
        self.name = name
        self.store = StateStore(state / f"{name}.db")
        self.store.open()
        local = LocalLedger(self.store)
        self.rt = Runtime(
            shared=SharedState(), host=PluginHost(), thread_workers=1, process_workers=1,
            ledger=local,
        )  # fmt: skip
        self.fleet = FleetLedger(local, FleetDB(cfg, name, "test"), cfg)
        self.rt.ledgers["fleet"] = self.fleet
        self.jobs = JobSet(self.rt)

    async def start(self, *specs: JobSpec, run: bool = True) -> None:
        for spec in specs:
            job = ScheduledJob(spec, self.rt, cursor=None)
            assert job.ledger is self.fleet  # by the job's scope
            self.jobs.jobs[spec.name] = job
        await self.fleet.start(self.jobs, [s.config for s in specs])
        if run:
            for job in self.jobs.jobs.values():
                job.start()

    async def halt(self) -> None:
        """Stop scheduling and let the finishes be written; the database stays open."""
        tasks = self.jobs.stop()
        self.jobs.cancel_runs("test over")
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for job in self.jobs.jobs.values():
            if job.task is not None:
                await asyncio.wait([job.task], timeout=5)
        await self.rt.settle()
        await asyncio.wait_for(self.fleet.writes.join(), 10)

    async def stop(self) -> None:
        await self.halt()
        await self.fleet.close()
        self.store.close()


def _spec(func: Callable[..., Any], name: str = "j", **cfg: Any) -> JobSpec:
    cfg.setdefault("schedule", "every")
    cfg.setdefault("every", 0.1)
    cfg.setdefault("grace", 5.0)
    cfg.setdefault("scope", "fleet")
    config = JobConfig(name=name, type="t", **cfg)
    return JobSpec(config, JobType("t", func), make_trigger(config))


async def _until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
async def hosts(
    postgres: PgServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[list[Host]]]]:
    made: list[Host] = []

    async def make(n: int, **kw: Any) -> list[Host]:
        kw.setdefault("lease", 3.0)
        kw.setdefault("sweep", 0.3)
        cfg = fleet_config(postgres, tmp_path, **kw)
        new = [Host(f"h{i + 1}", cfg, tmp_path) for i in range(n)]
        made.extend(new)
        return new

    yield make
    for h in made:
        await h.stop()


async def _rows(h: Host, job: str = "j") -> list[dict[str, Any]]:
    rows = await h.fleet.db.conn.require().fetch(
        "SELECT tick, owner, fence, state, cause, takeovers, lost_owners, result "
        "FROM taskd.claims WHERE job = $1 ORDER BY tick", job
    )  # fmt: skip
    return [dict(r) for r in rows]


class TestFleetRuns:
    """Each tick runs once in the fleet, on record in the DB and in the runner's history."""

    async def test_three_hosts_run_each_tick_once(self, hosts: Any) -> None:
        runs: list[tuple[str, float, int]] = []

        def job_for(name: str) -> Callable[..., Any]:
            async def func(ctx: Any) -> dict[str, Any]:
                runs.append((name, ctx.scheduled.timestamp(), ctx.fence))
                return {"by": name}

            return func

        hs = await hosts(3)
        for h in hs:
            await h.start(_spec(job_for(h.name)))
        await _until(lambda: len(runs) >= 30)
        for h in hs:
            await h.halt()
        rows = await _rows(hs[0])
        ticks = [t for _, t, _ in runs]
        assert len(ticks) == len(set(ticks))  # no tick ran twice
        assert len(rows) == len({r["tick"] for r in rows})
        fences = {f for _, _, f in runs}
        assert fences == {r["fence"] for r in rows if r["state"] == "succeeded"}
        # Every claim that succeeded ran on its owner, whose result is the row's.
        by_fence = {f: n for n, _, f in runs}
        for r in rows:
            if r["state"] == "succeeded":
                assert r["result"] == f'{{"by": "{by_fence[r["fence"]]}"}}'
        assert len({n for n, _, _ in runs}) >= 2  # the work spread (the race is fair)
        skipped = sum(h.rt.stats.skips.get(("j", "elsewhere"), 0) for h in hs)
        assert skipped >= len(runs)  # each tick won once was lost by the others

    async def test_history_and_result_on_the_owner(self, hosts: Any) -> None:
        (h1,) = await hosts(1)

        async def func(ctx: Any) -> int:
            return int(ctx.fence)

        await h1.start(_spec(func, every=0.2))
        await _until(lambda: h1.rt.stats.outcomes.get(("j", Outcome.SUCCEEDED), 0) >= 2)
        await _until(lambda: not h1.fleet.held)
        rows = [r for r in await _rows(h1) if r["state"] == "succeeded"]
        assert rows and all(r["owner"] == "h1" and r["result"] == str(r["fence"]) for r in rows)
        state = await h1.fleet.db.get_state()
        assert state["j"] == max(r["fence"] for r in rows)
        await h1.store.durable()
        assert {r["trigger"] for r in h1.store.history("j", limit=50)} == {"schedule"}


class TestLostClaims:
    """The heartbeat cancels a run taken over elsewhere; the sweep runs it here."""

    async def test_takeover_cancels_the_old_run_and_runs_here(
        self, hosts: Any, logs: list[dict[str, Any]]
    ) -> None:
        started: list[tuple[str, int, float]] = []
        release = asyncio.Event()

        def job_for(name: str) -> Callable[..., Any]:
            async def func(ctx: Any) -> str:
                started.append((name, ctx.fence, ctx.scheduled.timestamp()))
                if name == "h1":
                    await asyncio.sleep(3600)  # stays until its claim is lost
                await release.wait()
                return name

            return func

        h1, h2 = await hosts(2, lease=3.0)
        spec = dict(schedule="at", at=time.time() + 0.3, grace=30.0)
        await h1.start(_spec(job_for("h1"), **spec))
        await _until(lambda: bool(started))
        (_, f1, tick), *_ = started
        # h2 knows the job but does not schedule it: it only sweeps.
        await h2.start(_spec(job_for("h2"), **spec), run=False)
        # h1 "stops answering": its row's lease ends now; h2's sweep takes it over.
        await h2.fleet.db.conn.require().execute(
            "UPDATE taskd.claims SET lease_until = now() - interval '1s' WHERE fence = $1", f1
        )
        await _until(lambda: len(started) == 2)
        name, f2, tick2 = started[1]
        assert (name, tick2) == ("h2", tick) and f2 > f1
        # h1's next heartbeat finds fence f1 gone and cancels its run.
        await _until(lambda: h1.rt.stats.outcomes.get(("j", Outcome.CANCELLED), 0) == 1)
        lost = [e for e in logs if e["event"] == "fleet_claim_lost"]
        assert lost and lost[0]["fence"] == f1
        release.set()
        await _until(lambda: h2.rt.stats.outcomes.get(("j", Outcome.SUCCEEDED), 0) == 1)
        await _until(lambda: not h2.fleet.held)
        (row,) = await _rows(h2)
        assert (row["owner"], row["fence"], row["state"], row["takeovers"]) == (
            "h2", f2, "succeeded", 1)  # fmt: skip
        assert row["lost_owners"] == ["h1"]
        await h2.store.durable()
        assert [r["trigger"] for r in h2.store.history("j")] == ["takeover"]

    async def test_database_down_past_the_lease_cancels_then_catches_up(
        self, hosts: Any, postgres: PgServer, logs: list[dict[str, Any]]
    ) -> None:
        ran: list[float] = []

        async def func(ctx: Any) -> None:
            ran.append(ctx.scheduled.timestamp())
            if len(ran) == 1:
                await asyncio.sleep(3600)  # the first run is still going when the DB goes

        (h1,) = await hosts(1, lease=3.0)
        spec = _spec(func, every=1.0, catchup="all", grace=0.5, overlap="allow")
        await h1.start(spec)
        await _until(lambda: bool(ran))
        postgres.stop()
        # No heartbeat gets through: the local deadline (lease - margin after the last
        # one was sent) cancels the run before any other host could take it.
        await _until(lambda: h1.rt.stats.outcomes.get(("j", Outcome.CANCELLED), 0) == 1)
        assert [e for e in logs if e["event"] == "fleet_claim_lost"]
        await _until(lambda: h1.rt.stats.skips.get(("j", "fleet_unavailable"), 0) >= 2)
        assert len(ran) == 1  # never run unclaimed
        first = h1.fleet.held_from["j"][0]
        postgres.start()
        back = time.time()
        # Back: catchup = "all", so every tick skipped while down runs now, once.
        assert spec.trigger is not None
        missed, t = [], first
        while t < back - 1:
            missed.append(t)
            t = spec.trigger.next_after(t) or back
        await _until(lambda: set(missed) <= set(ran), timeout=60)
        rows = {r["tick"].timestamp(): r for r in await _rows(h1)}
        assert {rows[t]["cause"] for t in missed} == {"catchup"}
        assert sorted(ran).count(missed[0]) == 1


class TestPause:
    async def test_pause_on_one_host_reaches_the_others(self, hosts: Any) -> None:
        async def func(ctx: Any) -> None:
            return None

        h1, h2 = await hosts(2)
        await h1.start(_spec(func, every=0.2))
        await h2.start(_spec(func, every=0.2))
        assert h1.jobs.set_paused("j", True)
        await _until(lambda: h2.jobs.get("j").paused)
        assert (await h2.fleet.db.paused(["j"])) == {"j": True}
        n = len(await _rows(h1))
        await asyncio.sleep(0.6)  # three ticks: none is claimed
        assert len(await _rows(h1)) == n
        assert h2.jobs.set_paused("j", False)
        await _until(lambda: not h1.jobs.get("j").paused)
        for _ in range(500):
            if len(await _rows(h1)) > n:
                break
            await asyncio.sleep(0.02)
        assert len(await _rows(h1)) > n  # runs again


class TestFleetState:
    """ctx.state of a fleet run is the fleet's, written fenced."""

    async def test_writes_land_and_a_stale_fence_is_fenced_out(self, hosts: Any) -> None:
        from taskd.fleet.state import FencedOut, FleetState

        seen: list[int] = []

        async def func(ctx: Any) -> None:
            assert isinstance(ctx.state, FleetState)
            async with ctx.state.locked() as state:
                state["n"] = state.get("n", 0) + 1
                state["last"] = ctx.fence
                state.pop("gone", None)
            seen.append(ctx.fence)

        (h1,) = await hosts(1)
        await h1.start(_spec(func, every=0.2))
        await _until(lambda: len(seen) >= 2)
        await _until(lambda: not h1.fleet.held)
        state = await h1.fleet.db.get_state()
        assert state["n"] >= 2 and state["last"] >= seen[1]
        # A fence that holds no live claim: every write refused, none kept.
        stale = FleetState(h1.fleet.db, "j", seen[0])
        with pytest.raises(FencedOut, match=f"fence {seen[0]} no longer holds job 'j'"):
            async with stale.locked() as st:
                st["n"] = -1
        assert (await h1.fleet.db.get_state())["n"] >= 2


class TestRefused:
    """A database this taskd must not use refuses the fleet jobs, with the reason."""

    async def test_a_newer_schema_refuses_every_tick_with_the_reason(
        self, hosts: Any, logs: list[dict[str, Any]]
    ) -> None:
        ran: list[float] = []

        async def func(ctx: Any) -> None:
            ran.append(ctx.scheduled.timestamp())

        h0, h1 = await hosts(2)
        await h0.fleet.db.open()  # creates the schema; then "a newer taskd" moves it on
        await h0.fleet.db.conn.require().execute("UPDATE taskd.meta SET schema_version = 99")
        await h1.start(_spec(func))
        assert h1.fleet.db.state == "refused"
        await _until(lambda: h1.rt.stats.skips.get(("j", "fleet_unavailable"), 0) >= 2)
        assert not ran
        (refused,) = [e for e in logs if e["event"] == "fleet_refused"]
        assert "schema v99 is newer than this taskd (v2)" in refused["error"]
        assert h1.fleet.status()["db"] == "refused"
        refusals = [e for e in logs if e["event"] == "not_claimed"]
        assert refusals and "upgrade taskd" in refusals[0]["detail"]

    async def test_a_wrong_password_is_retried_and_a_fixed_file_picked_up(
        self, hosts: Any, tmp_path: Path
    ) -> None:
        ran: list[float] = []

        async def func(ctx: Any) -> None:
            ran.append(ctx.scheduled.timestamp())

        (h1,) = await hosts(1)
        pw = h1.fleet.cfg.password_file
        assert pw is not None
        right = pw.read_text()
        pw.write_text("not-the-password\n")
        await h1.start(_spec(func))  # no exception: the start goes on, fleet jobs skip
        assert h1.fleet.db.state in ("down", "reconnecting")
        await _until(lambda: h1.rt.stats.skips.get(("j", "fleet_unavailable"), 0) >= 1)
        assert not ran
        pw.write_text(right)  # read again at the next connect
        await _until(lambda: bool(ran), timeout=40)
        # A claim may go through once the connection is back, just before the start's
        # preparation marks the ledger ready: wait for it rather than read it at once.
        await _until(lambda: h1.fleet.ready, timeout=10)
        assert h1.fleet.db.state == "up"
