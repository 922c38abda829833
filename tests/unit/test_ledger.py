"""The ledger seam (taskd.ledger): LocalLedger writes what the store wrote before the seam,
NullLedger writes nothing, and a runtime runs jobs end to end over either."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskd.config.model import JobConfig
from taskd.jobspec import JobSpec, make_trigger
from taskd.ledger import (
    HOST_CLAIM,
    NULL_LEDGER,
    Claim,
    Ledger,
    LocalLedger,
    NoFleetLedger,
    NullLedger,
)
from taskd.plugin.jobtype import JobType
from taskd.plugin.manager import PluginHost
from taskd.run.encoding import encode
from taskd.run.events import Cause, Outcome
from taskd.run.runner import RunInfo
from taskd.run.runtime import Runtime
from taskd.run.sinks import RunEnd
from taskd.schedule.job import ScheduledJob
from taskd.state.shared import SharedState
from taskd.state.store import StateStore


async def _ok(ctx: Any) -> int:
    return 7


def _spec(name: str, **cfg: Any) -> JobSpec:
    config = JobConfig(name=name, type="t", schedule="every", every=0.05, **cfg)
    return JobSpec(config, JobType("t", _ok), make_trigger(config))


class TestClaim:
    """The host path's claim is one shared constant."""

    def test_host_claim_has_no_fence_owner_or_lease_end(self) -> None:
        assert Claim() == HOST_CLAIM
        assert (HOST_CLAIM.fence, HOST_CLAIM.owner, HOST_CLAIM.lease_until) == (
            None,
            None,
            float("inf"),
        )

    def test_frozen(self) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            HOST_CLAIM.fence = 1  # type: ignore[misc]


class TestLocalLedger:
    """Each call is the store write it replaced, read back from a real store (no loop
    running: each is written through at once)."""

    def test_advance_is_the_cursor(self, store: StateStore) -> None:
        LocalLedger(store).advance("a", 120.0)
        assert store.jobs()["a"].last_tick == 120.0

    def test_open_run_is_a_running_row(self, store: StateStore) -> None:
        info = RunInfo("r1", "a", 10.0, 10.5, Cause.MANUAL)
        assert LocalLedger(store).open_run(info) is HOST_CLAIM
        [row] = store.history("a")
        assert (row["run_id"], row["outcome"], row["scheduled"], row["started"]) == (
            "r1",
            "running",
            10.0,
            10.5,
        )
        assert row["trigger"] == "manual"
        cursor = store.jobs().get("a")  # a run's start does not move the cursor
        assert cursor is None or cursor.last_tick is None

    def test_advance_and_open_is_both(self, store: StateStore) -> None:
        info = RunInfo("r1", "a", 30.0, 30.25, Cause.SCHEDULE)
        assert LocalLedger(store).advance_and_open("a", 30.0, info) is HOST_CLAIM
        assert store.jobs()["a"].last_tick == 30.0
        [row] = store.history("a")
        assert (row["run_id"], row["outcome"], row["scheduled"]) == ("r1", "running", 30.0)

    def test_finish_is_the_history_row_and_the_last_run(self, store: StateStore) -> None:
        ledger = LocalLedger(store)
        info = RunInfo("r1", "a", 10.0, 10.5, Cause.SCHEDULE)
        ledger.open_run(info)
        info.attempt, info.outcome, info.error, info.ended = 2, Outcome.FAILED, "E: x", 11.0
        end = RunEnd.of(_spec("a"), info, NULL_LEDGER)
        end.failures = 3
        ledger.finish(end)
        [row] = store.history("a")
        assert (row["run_id"], row["outcome"], row["attempts"], row["error"]) == (
            "r1",
            "failed",
            2,
            "E: x",
        )
        assert row["duration"] == 0.5
        job = store.jobs()["a"]
        assert (job.last_run_id, job.last_outcome, job.failures) == ("r1", "failed", 3)

    def test_finish_keeps_the_result(self, store: StateStore) -> None:
        info = RunInfo("r1", "a", 10.0, 10.5, Cause.SCHEDULE)
        info.outcome, info.result, info.ended = Outcome.SUCCEEDED, 7, 10.75
        info.encoded = encode(7, 1 << 20)
        LocalLedger(store).finish(RunEnd.of(_spec("a"), info, NULL_LEDGER))
        assert store.jobs()["a"].last_result == 7
        with sqlite3.connect(store.path) as db:
            assert db.execute("SELECT result FROM runs WHERE run_id = 'r1'").fetchall() == [("7",)]

    def test_set_paused(self, store: StateStore) -> None:
        ledger = LocalLedger(store)
        ledger.set_paused("a", True)
        assert store.jobs()["a"].paused
        ledger.set_paused("a", False)
        assert not store.jobs()["a"].paused

    def test_on_record_after_a_reopen(self, tmp_path: Path, store: StateStore) -> None:
        ledger = LocalLedger(store)
        ledger.advance_and_open("a", 5.0, RunInfo("r1", "a", 5.0, 5.1, Cause.SCHEDULE))
        ledger.set_paused("a", True)
        store.close()
        again = StateStore(tmp_path / "state.db")
        again.open()
        try:
            row = again.jobs()["a"]
            assert (row.last_tick, row.paused) == (5.0, True)
            assert again.history("a")[0]["run_id"] == "r1"
        finally:
            again.close()


class TestNullLedger:
    """Writes nothing, grants every run."""

    def test_one_shared_stateless_instance(self) -> None:
        assert isinstance(NULL_LEDGER, NullLedger)
        assert not hasattr(NULL_LEDGER, "__dict__")

    def test_every_call_grants_or_does_nothing(self) -> None:
        info = RunInfo("r1", "a", 1.0, 1.0, Cause.SCHEDULE)
        assert NULL_LEDGER.open_run(info) is HOST_CLAIM
        assert NULL_LEDGER.advance_and_open("a", 1.0, info) is HOST_CLAIM
        NULL_LEDGER.advance("a", 1.0)
        NULL_LEDGER.set_paused("a", True)
        info.outcome, info.ended = Outcome.SUCCEEDED, 1.5
        NULL_LEDGER.finish(RunEnd.of(_spec("a"), info, NULL_LEDGER))

    def test_the_runtime_default(self) -> None:
        rt = Runtime(shared=SharedState(), host=PluginHost(), thread_workers=1, process_workers=1)
        assert rt.ledgers["host"] is NULL_LEDGER
        # Until a fleet ledger takes its place, fleet jobs are refused, never run unclaimed.
        assert isinstance(rt.ledgers["fleet"], NoFleetLedger)
        assert rt.ledgers["fleet"].may_refuse


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def _wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _exercise(rt: Runtime, ledger: Ledger | None = None) -> tuple[ScheduledJob, ScheduledJob]:
    """Every write site once: runs on the fused path ("fast") and the general one ("slow":
    retries), a manual run, a pause and a resume, and a reschedule. ``ledger``: the jobs'
    own, in place of the runtime's host ledger."""
    fast, slow = _spec("fast"), _spec("slow", retries=1)
    assert fast.fast and not slow.fast
    jobs = [ScheduledJob(fast, rt, cursor=None), ScheduledJob(slow, rt, cursor=None)]
    for job in jobs:
        if ledger is not None:
            job.ledger = ledger
        job.start()
    outcomes = rt.stats.outcomes
    await _wait_until(lambda: all(outcomes[(j.name, Outcome.SUCCEEDED)] >= 2 for j in jobs))
    for job in jobs:
        job.set_paused(True)
        assert job.trigger_now() is None  # a manual run goes on while paused
        job.set_paused(False)
        job.update(
            dataclasses.replace(job.spec, config=dataclasses.replace(job.spec.config, every=0.06))
        )
    await _wait_until(lambda: all(outcomes[(j.name, Outcome.SUCCEEDED)] >= 5 for j in jobs))
    for job in jobs:
        job.stop()
    await asyncio.wait([j.task for j in jobs if j.task is not None], timeout=2)
    await rt.settle()
    return jobs[0], jobs[1]


class TestEndToEnd:
    """A runtime runs scheduled jobs through each ledger."""

    async def test_local_ledger_records_cursor_runs_and_pause(self, store: StateStore) -> None:
        ledger: Ledger = LocalLedger(store)
        rt = Runtime(
            shared=SharedState(),
            host=PluginHost(),
            thread_workers=1,
            process_workers=1,
            ledger=ledger,
        )
        jobs = await _exercise(rt)
        await store.durable()
        rows = store.jobs()
        for job in jobs:
            row = rows[job.name]
            assert row.last_tick == job.cursor
            assert not row.paused
            assert (row.last_outcome, row.last_result) == ("succeeded", 7)
            history = store.history(job.name, limit=1000)
            assert {r["outcome"] for r in history} == {"succeeded"}
            assert {r["trigger"] for r in history} >= {"schedule", "manual"}
            assert len(history) == rt.stats.outcomes[(job.name, Outcome.SUCCEEDED)]
        await rt.close(kill=False)

    async def test_null_ledger_leaves_no_state(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)  # anything written to a relative path would land here
        rt = Runtime(shared=SharedState(), host=PluginHost(), thread_workers=1, process_workers=1)
        await _exercise(rt)
        assert rt.stats.outcomes[("fast", Outcome.SUCCEEDED)] >= 5
        assert rt.stats.outcomes[("slow", Outcome.SUCCEEDED)] >= 5
        await rt.close(kill=False)
        assert _files(tmp_path) == []


class Recorder:
    """A Ledger that keeps what it is told, in order, and grants every run."""

    may_refuse = False

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def advance(self, job: str, tick: float) -> None:
        self.calls.append(("advance", job))

    def open_run(self, info: RunInfo) -> Claim:
        self.calls.append(("open_run", info.job, info.run_id))
        return HOST_CLAIM

    async def claim(self, info: RunInfo) -> Claim:
        raise AssertionError("a ledger that grants every run is never asked to claim")

    def advance_and_open(self, job: str, tick: float, info: RunInfo) -> Claim:
        self.calls.append(("advance_and_open", job, info.run_id))
        return HOST_CLAIM

    def finish(self, end: RunEnd) -> None:
        self.calls.append(("finish", end.info.job, end.info.run_id))

    def set_paused(self, job: str, paused: bool) -> None:
        self.calls.append(("set_paused", job, paused))

    def of(self, kind: str, job: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[:2] == (kind, job)]


class TestPerJob:
    """Each job holds its ledger; every write about it goes there, and a run ends with the
    ledger it started with."""

    def test_a_job_takes_the_host_ledger(self, store: StateStore) -> None:
        rt = Runtime(
            shared=SharedState(),
            host=PluginHost(),
            thread_workers=1,
            process_workers=1,
            ledger=LocalLedger(store),
        )
        assert ScheduledJob(_spec("a"), rt, cursor=None).ledger is rt.ledgers["host"]

    def test_the_scope_picks_the_ledger_and_a_reload_switches_it(self, rt: Runtime) -> None:
        fleet_cfg = dataclasses.replace(_spec("a").config, scope="fleet")
        fleet = JobSpec(fleet_cfg, _spec("a").jobtype, make_trigger(fleet_cfg))
        job = ScheduledJob(fleet, rt, cursor=None)
        assert job.ledger is rt.ledgers["fleet"]
        job.update(_spec("a"))
        assert job.ledger is rt.ledgers["host"]
        job.update(fleet)
        assert job.ledger is rt.ledgers["fleet"]

    async def test_every_write_goes_to_the_jobs_ledger(self, rt: Runtime) -> None:
        mine = Recorder()
        ledger: Ledger = mine
        await _exercise(rt, ledger)
        for name in ("fast", "slow"):
            runs = rt.stats.outcomes[(name, Outcome.SUCCEEDED)]
            opened = mine.of("open_run", name) + mine.of("advance_and_open", name)
            assert {c[2] for c in opened} == {c[2] for c in mine.of("finish", name)}
            assert len(opened) == runs
            assert mine.of("set_paused", name) == [
                ("set_paused", name, True),
                ("set_paused", name, False),
            ]
            assert mine.of("advance", name)  # the reschedule, at least
        assert mine.of("advance_and_open", "fast")  # the fused path
        assert not mine.of("advance_and_open", "slow")  # retries: the general path

    async def test_a_run_ends_with_the_ledger_it_started_with(self, rt: Runtime) -> None:
        gate = asyncio.Event()

        async def held(ctx: Any) -> None:
            await gate.wait()

        config = JobConfig(name="a", type="t", schedule="at", at=4070908800.0, overlap="allow")
        job = ScheduledJob(
            JobSpec(config, JobType("t", held), make_trigger(config)), rt, cursor=None
        )
        first, second = Recorder(), Recorder()
        job.ledger = first
        job.start()
        assert job.trigger_now() is None
        await _wait_until(lambda: bool(first.calls))
        job.ledger = second  # as a reload that changed the job's scope would
        gate.set()
        await _wait_until(lambda: not job.active)
        await rt.settle()
        assert [c[0] for c in first.calls] == ["open_run", "finish"]
        assert second.calls == []
        job.stop()
        if job.task is not None:
            await asyncio.wait([job.task], timeout=2)
