"""A ledger may refuse a run (issue 10 C4): the refused tick is a counted skip with the
ledger's reason, with no run line and no history row; a granted run carries its claim's
fence in ``ctx.fence``; a manual run is answered with the reason; and such a job never takes
the fused path. The ledger here is a LocalLedger that asks first (as a fleet's does) and
refuses every second claim."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from taskd.config.model import JobConfig
from taskd.control.commands import _refused
from taskd.jobspec import JobSpec, make_trigger
from taskd.ledger import Claim, LocalLedger, NotClaimed
from taskd.plugin.jobtype import JobType
from taskd.plugin.manager import PluginHost
from taskd.run.events import Cause, Outcome, SkipReason
from taskd.run.runner import RunInfo
from taskd.run.runtime import Runtime
from taskd.schedule.job import ScheduledJob
from taskd.schedule.jobset import SKIP_TEXT
from taskd.schedule.manual import ManualRun
from taskd.state.shared import SharedState
from taskd.state.store import StateStore


class AsksFirst(LocalLedger):
    """Claims each run before it opens it; refuses the claims ``refuse`` picks (by their
    number, from 1) with ``reason``; grants the others with fences 100, 101, ..."""

    may_refuse = True
    __slots__ = ("asked", "fast_opened", "gate", "granted", "reason", "refuse", "refused")

    def __init__(
        self,
        store: StateStore,
        refuse: Callable[[int, RunInfo], bool] = lambda n, info: n % 2 == 0,
        reason: SkipReason = SkipReason.ELSEWHERE,
    ) -> None:
        super().__init__(store)
        self.refuse = refuse
        self.reason = reason
        self.asked = 0
        self.granted: dict[str, int] = {}  # run id -> fence
        self.refused: list[str] = []  # run ids
        self.fast_opened = 0
        self.gate: asyncio.Event | None = None  # set: claims wait for it

    def open_run(self, info: RunInfo) -> Claim | None:
        return None  # always ask first

    async def claim(self, info: RunInfo) -> Claim:
        self.asked += 1
        n = self.asked
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse(n, info):
            self.refused.append(info.run_id)
            raise NotClaimed(self.reason, "tick claimed first", holder="h2")
        LocalLedger.open_run(self, info)
        fence = 99 + n
        self.granted[info.run_id] = fence
        return Claim(fence=fence, owner="h1")

    def advance_and_open(self, job: str, tick: float, info: RunInfo) -> Claim:
        self.fast_opened += 1  # the fused path: must never happen for this ledger
        return super().advance_and_open(job, tick, info)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
def runtime(store: StateStore) -> Runtime:
    return Runtime(
        shared=SharedState(),
        host=PluginHost(),
        thread_workers=1,
        process_workers=1,
        ledger=LocalLedger(store),
    )


def _spec(func: Callable[..., Any], **cfg: Any) -> JobSpec:
    cfg.setdefault("schedule", "every")
    if cfg["schedule"] == "every":
        cfg.setdefault("every", 0.05)
    config = JobConfig(name="j", type="t", **cfg)
    return JobSpec(config, JobType("t", func), make_trigger(config))


async def _wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _stop(job: ScheduledJob, rt: Runtime) -> None:
    job.stop()
    job.cancel_runs("test over")
    if job.task is not None:
        await asyncio.wait([job.task], timeout=2)
    await rt.settle()


def _run_lines(logs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["run_id"]: e for e in logs if e["event"] == "run"}


class TestScheduledTicks:
    @pytest.mark.parametrize("overlap", ["skip", "allow"])  # inline, and a task per run
    async def test_refused_ticks_are_skips_granted_ones_runs_with_their_fence(
        self,
        runtime: Runtime,
        store: StateStore,
        logs: list[dict[str, Any]],
        overlap: str,
    ) -> None:
        fences: dict[str, int | None] = {}

        async def job_func(ctx: Any) -> None:
            fences[ctx.run_id] = ctx.fence

        spec = _spec(job_func, overlap=overlap)
        job = ScheduledJob(spec, runtime, cursor=None)
        ledger = AsksFirst(store)
        job.ledger = ledger
        job.start()
        await _wait_until(lambda: len(ledger.granted) >= 3 and len(ledger.refused) >= 3)
        await _stop(job, runtime)
        await store.durable()

        granted, refused = ledger.granted, ledger.refused
        # Every claim is counted once: a run, or a skip with the ledger's reason.
        assert runtime.stats.skips[("j", "elsewhere")] == len(refused)
        assert runtime.stats.outcomes[("j", Outcome.SUCCEEDED)] == len(granted)
        lines = _run_lines(logs)
        assert set(lines) == set(granted)  # no run line for a refused tick
        assert not set(refused) & set(lines)
        history = store.history("j", limit=1000)
        assert {r["run_id"] for r in history} == set(granted)  # no history row either
        # The job saw each granted run's own fence.
        assert fences == granted
        # Refusals by another host are expected: logged at debug level, never a warning.
        skipped = [e for e in logs if e["event"] == "skipped"]
        assert skipped and {e["reason"] for e in skipped} == {"elsewhere"}
        assert {e["log_level"] for e in skipped} == {"debug"}
        assert not [e for e in logs if e["event"] in ("run_crashed", "scheduler_crashed")]

    async def test_a_job_whose_ledger_may_refuse_never_takes_the_fused_path(
        self, runtime: Runtime, store: StateStore
    ) -> None:
        async def job_func(ctx: Any) -> None:
            return None

        spec = _spec(job_func)
        assert spec.fast  # the config alone would fuse it
        job = ScheduledJob(spec, runtime, cursor=None)
        ledger = AsksFirst(store, refuse=lambda n, info: False)
        job.ledger = ledger
        job.start()
        await _wait_until(lambda: len(ledger.granted) >= 3)
        await _stop(job, runtime)
        assert ledger.fast_opened == 0
        assert ledger.asked == len(ledger.granted)

    async def test_the_fleet_is_down_reason(
        self, runtime: Runtime, store: StateStore, logs: list[dict[str, Any]]
    ) -> None:
        async def job_func(ctx: Any) -> None:
            return None

        job = ScheduledJob(_spec(job_func), runtime, cursor=None)
        ledger = AsksFirst(store, refuse=lambda n, info: True, reason=SkipReason.FLEET_UNAVAILABLE)
        job.ledger = ledger
        job.start()
        await _wait_until(lambda: ledger.asked >= 2)
        await _stop(job, runtime)
        assert runtime.stats.skips[("j", "fleet_unavailable")] == len(ledger.refused) >= 2
        assert not _run_lines(logs)
        (first, *_) = [e for e in logs if e["event"] == "skipped"]
        assert first["log_level"] == "warning"  # unlike "elsewhere", a problem to see


class TestManual:
    async def test_trigger_wait_is_answered_with_the_reason(
        self, runtime: Runtime, store: StateStore, logs: list[dict[str, Any]]
    ) -> None:
        async def job_func(ctx: Any) -> None:
            return None

        spec = _spec(job_func, schedule="at", at=4070908800.0)
        job = ScheduledJob(spec, runtime, cursor=None)
        ledger = AsksFirst(store, refuse=lambda n, info: info.cause is Cause.MANUAL)
        ledger.reason = SkipReason.PAUSED  # paused on another host
        job.ledger = ledger
        job.start()
        waiter = ManualRun()
        assert job.trigger_now(waiter) is None
        ended = await asyncio.wait_for(waiter.ended, 5)
        assert ended is SkipReason.PAUSED
        await _stop(job, runtime)
        assert not _run_lines(logs)
        assert store.history("j") == []
        # A manual run is no tick: refused, not counted as a skip.
        assert not runtime.stats.skips
        assert [e["reason"] for e in logs if e["event"] == "trigger_refused"] == ["paused"]
        # What `taskd trigger --wait` then prints.
        assert "was not run: the job is paused" in str(_refused("j", ended))

    def test_every_new_reason_has_a_text(self) -> None:
        for reason in (SkipReason.ELSEWHERE, SkipReason.FLEET_UNAVAILABLE, SkipReason.CLOCK_SKEW):
            assert str(_refused("j", reason)).endswith(SKIP_TEXT[reason])  # a sentence


class TestCancelledWhileClaiming:
    """A run cancelled before its claim was granted was never opened: no run line, no
    history row; its tick is a skip."""

    @pytest.mark.parametrize("overlap", ["skip", "allow"])
    async def test_stop_while_claiming(
        self,
        runtime: Runtime,
        store: StateStore,
        logs: list[dict[str, Any]],
        overlap: str,
    ) -> None:
        async def job_func(ctx: Any) -> None:
            raise AssertionError("never granted, never run")

        job = ScheduledJob(_spec(job_func, overlap=overlap), runtime, cursor=None)
        ledger = AsksFirst(store, refuse=lambda n, info: False)
        ledger.gate = asyncio.Event()  # never set: every claim hangs
        job.ledger = ledger
        job.start()
        await _wait_until(lambda: ledger.asked >= 1)
        await _stop(job, runtime)
        await store.durable()
        assert not job.active
        assert not _run_lines(logs)
        assert store.history("j") == []
        assert runtime.stats.running == 0
        assert runtime.stats.skips[("j", "shutdown")] >= 1
        assert not runtime.stats.outcomes

    async def test_cancelled_before_its_first_step(
        self, runtime: Runtime, store: StateStore, logs: list[dict[str, Any]]
    ) -> None:
        """overlap = "allow": a run task cancelled before execute ever ran (it never
        asked its ledger) is no cancelled run, as it would be for a host job."""

        async def job_func(ctx: Any) -> None:
            raise AssertionError("never run")

        job = ScheduledJob(
            _spec(job_func, overlap="allow", schedule="at", at=4070908800.0), runtime, cursor=None
        )
        job.ledger = AsksFirst(store)
        info = job.start_run(time.time(), Cause.SCHEDULE)
        job.cancel_runs("replaced by a newer run")  # in the same loop iteration
        await _wait_until(lambda: not job.active)
        await runtime.settle()
        assert job.ledger.asked == 0  # type: ignore[attr-defined]
        assert info.run_id not in _run_lines(logs)
        assert store.history("j") == []
        assert runtime.stats.skips[("j", "replaced")] == 1
