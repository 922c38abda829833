"""ScheduledJob in-process: the cases a review found, each pinned by a test."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from taskd.config.model import JobConfig
from taskd.jobspec import JobSpec, make_trigger
from taskd.plugin.jobtype import JobType
from taskd.run.runtime import Runtime
from taskd.schedule import skips as skips_module
from taskd.schedule.decide import MAX_CATCHUP
from taskd.schedule.job import ScheduledJob


def make_spec(func: Callable[..., Any], **cfg: Any) -> JobSpec:
    schedule = cfg.pop("schedule", "every")
    if schedule == "every":
        cfg.setdefault("every", 0.1)
    config = JobConfig(name=cfg.pop("name", "j"), type="t", schedule=schedule, **cfg)
    return JobSpec(config, JobType("t", func), make_trigger(config))


@pytest.fixture
def logs():
    with capture_logs() as captured:
        yield captured


def runs(logs: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "run" and all(e.get(k) == v for k, v in match.items())]


def skips(logs: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "skipped" and e["reason"] == reason]


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def stop(job: ScheduledJob, rt: Runtime) -> None:
    job.stop()
    job.cancel_runs("test over")
    if job.task is not None:
        await asyncio.wait([job.task], timeout=2)
    await rt.settle()


async def switch_to_replace_mid_run(
    func: Callable[..., Any], rt: Runtime, logs: list[dict[str, Any]], timeout: float
) -> None:
    """Start a skip job, switch it to overlap = replace while a run is inline, and check the
    job goes on (two runs cancelled by newer ones, its own task alive, no crash logged)."""
    job = ScheduledJob(make_spec(func, every=0.1), rt, cursor=None)
    job.start()
    await wait_until(lambda: bool(job.active))
    job.update(
        dataclasses.replace(
            job.spec, config=dataclasses.replace(job.spec.config, overlap="replace")
        )
    )
    await wait_until(lambda: len(runs(logs, outcome="cancelled")) >= 2, timeout=timeout)
    assert job.task is not None and not job.task.done()
    assert not [e for e in logs if e["event"] in ("scheduler_ended", "scheduler_crashed")]
    await stop(job, rt)


class TestInlineCancel:
    """Cancelling an inline run (its task is the job's own) must not end the job."""

    async def test_switch_to_replace_mid_run_keeps_scheduling(self, rt: Runtime, logs) -> None:
        async def slow(ctx: Any) -> None:
            await asyncio.sleep(0.35)

        await switch_to_replace_mid_run(slow, rt, logs, timeout=3)

    async def test_job_raising_cancelled_error_is_its_failure(self, rt: Runtime, logs) -> None:
        async def leaky(ctx: Any) -> None:
            raise asyncio.CancelledError

        job = ScheduledJob(make_spec(leaky, every=0.05), rt, cursor=None)
        job.start()
        await wait_until(lambda: len(runs(logs, outcome="failed")) >= 3)
        assert "raised by the job" in runs(logs, outcome="failed")[0]["error"]
        assert job.task is not None and not job.task.done()
        await stop(job, rt)


class TestBackoff:
    """A run cancelled while waiting to retry is cancelled, not failed."""

    async def test_cancel_during_backoff(self, rt: Runtime, logs) -> None:
        async def bad(ctx: Any) -> None:
            raise ValueError("nope")

        job = ScheduledJob(
            make_spec(bad, every=3600.0, schedule="every", retries=3, retry_backoff=30.0),
            rt,
            cursor=time.time() - 3600.0,
        )
        job.start()
        await wait_until(lambda: any(info.in_backoff for _, info in job.active.values()))
        job.cancel_runs("replaced by a newer run")
        await wait_until(lambda: bool(runs(logs)))
        await rt.settle()
        (line,) = runs(logs)
        assert line["outcome"] == "cancelled" and line["error"] == "replaced by a newer run"
        await stop(job, rt)


class TestCatchupBacklog:
    """More due ticks than MAX_CATCHUP: the newest run, the rest are skipped and counted."""

    async def test_all_runs_the_newest_ticks(self, rt: Runtime, logs) -> None:
        seen: list[float] = []

        async def record(ctx: Any) -> None:
            seen.append(ctx.scheduled.timestamp())

        now = math.floor(time.time())
        due = 2 * MAX_CATCHUP
        job = ScheduledJob(make_spec(record, every=1.0, catchup="all"), rt, cursor=float(now - due))
        job.start()
        await wait_until(lambda: len(seen) >= MAX_CATCHUP, timeout=10)
        (missed,) = skips(logs, "missed")
        assert missed["count"] == due - MAX_CATCHUP or missed["count"] == due - MAX_CATCHUP + 1
        assert seen[:MAX_CATCHUP] == sorted(seen[:MAX_CATCHUP])
        assert seen[0] == float(now - due + missed["count"] + 1)
        assert len(set(seen)) == len(seen)  # no tick twice
        await stop(job, rt)

    async def test_every_backlog_is_counted_without_stepping(self, rt: Runtime, logs) -> None:
        async def nothing(ctx: Any) -> None:
            return None

        # A month of every = "1s": counted arithmetically, not by 2.6M steps on the loop.
        start = time.monotonic()
        job = ScheduledJob(
            make_spec(nothing, every=1.0, catchup="latest"), rt, cursor=time.time() - 30 * 86400
        )
        job.start()
        await wait_until(lambda: bool(runs(logs)))
        assert time.monotonic() - start < 1.0
        total = sum(s["count"] for s in skips(logs, "missed") + skips(logs, "coalesced"))
        assert 30 * 86400 - 3 <= total <= 30 * 86400
        await stop(job, rt)


class TestSchedulesChangedByReload:
    """A job that has gone idle takes a new schedule from a reload."""

    async def test_startup_job_gets_an_every(self, rt: Runtime, logs) -> None:
        async def nothing(ctx: Any) -> None:
            return None

        job = ScheduledJob(make_spec(nothing, schedule="startup"), rt, cursor=None)
        job.start()
        await wait_until(lambda: len(runs(logs)) == 1)
        await asyncio.sleep(0.2)
        assert len(runs(logs)) == 1  # once, at start
        job.update(make_spec(nothing, every=0.05))
        await wait_until(lambda: len(runs(logs)) >= 4)
        await stop(job, rt)


class TestStop:
    """Once stopped, nothing new starts; what waited is skipped with a reason."""

    async def test_fire_after_stop_is_a_shutdown_skip(self, rt: Runtime, logs) -> None:
        async def nothing(ctx: Any) -> None:
            return None

        job = ScheduledJob(make_spec(nothing, every=3600.0), rt, cursor=None)
        job.start()
        await asyncio.sleep(0)
        job.stop()
        now = time.time()
        job._fire(now, now)
        assert skips(logs, "shutdown") and not job.active
        await stop(job, rt)


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


class TestSecondReview:
    """Cases a second review found in the first review's fixes."""

    async def test_slow_unwinding_run_under_replace_keeps_the_job(self, rt: Runtime, logs) -> None:
        async def stubborn(ctx: Any) -> None:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                await asyncio.sleep(0.35)  # unwinding takes longer than the interval
                raise

        await switch_to_replace_mid_run(stubborn, rt, logs, timeout=5)

    async def test_cron_backlog_over_one_slice_runs_the_newest_1000(
        self, rt: Runtime, logs
    ) -> None:
        seen: list[float] = []

        async def record(ctx: Any) -> None:
            seen.append(ctx.scheduled.timestamp())

        now = math.floor(time.time())
        backlog = 10_500  # more than one slice of MAX_STEPS ticks
        job = ScheduledJob(
            make_spec(record, schedule="cron", cron="* * * * * *", catchup="all"),
            rt,
            cursor=float(now - backlog),
        )
        job.start()
        await wait_until(lambda: len(seen) >= MAX_CATCHUP, timeout=20)
        first_run = seen[0]
        # Every tick before the first run is counted at once (the event, so the metrics);
        # the log adds them up in spans, and has them all once the job stops.
        counted = rt.stats.skips[("j", "missed")] + rt.stats.skips[("j", "coalesced")]
        assert counted == first_run - (now - backlog) - 1
        assert seen[:MAX_CATCHUP] == [first_run + i for i in range(MAX_CATCHUP)]
        await stop(job, rt)
        logged = sum(s["count"] for s in skips(logs, "missed") + skips(logs, "coalesced"))
        assert logged == counted

    async def test_fired_at_job_does_not_run_again_when_the_clock_goes_back(
        self, rt: Runtime, logs
    ) -> None:
        async def nothing(ctx: Any) -> None:
            return None

        at = time.time() + 100  # fired at this time, then the clock went back 100 s
        job = ScheduledJob(make_spec(nothing, schedule="at", at=at), rt, cursor=at)
        job.start()
        await asyncio.sleep(0.3)
        assert runs(logs) == []
        assert [e["event"] for e in logs].count("clock_went_back") == 1
        await stop(job, rt)

    @pytest.mark.parametrize("interval", [0.1, 0.3, 1 / 3, 0.01])
    def test_every_count_on_exact_ticks(self, rt: Runtime, interval: float) -> None:
        from taskd.schedule.decide import due_ticks
        from taskd.schedule.triggers import Every

        trigger = Every(interval)
        for k, n in ((7, 0), (1234567, 5), (10**9, 999), (3, 2500)):
            first = trigger.anchor + k * interval
            now = trigger.anchor + (k + n) * interval  # exactly on a tick
            ticks, count, more = due_ticks(trigger, first, now)
            assert count == n + 1 and more is None
            assert ticks[-1] <= now and len(ticks) == min(n + 1, MAX_CATCHUP)


class TestSkipSpans:
    """Skips are counted at once and logged per span (taskd.schedule.skips)."""

    async def test_a_long_span_is_logged_every_report_interval(
        self, rt: Runtime, logs, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(skips_module, "REPORT_EVERY", 0.3)
        gate = asyncio.Event()

        async def long_run(ctx: Any) -> None:
            await gate.wait()

        job = ScheduledJob(make_spec(long_run, every=0.05), rt, cursor=None)
        job.start()
        # The run goes on: the span never ends by itself, so the bound must report it.
        await wait_until(lambda: len(skips(logs, "overlap")) >= 3, timeout=5)
        lines = skips(logs, "overlap")
        assert lines[0]["count"] == 1  # the first skip, at once
        assert all(line["count"] > 1 for line in lines[1:3]), lines  # then ~6 per 0.3 s
        gate.set()
        await stop(job, rt)
        logged = sum(line["count"] for line in skips(logs, "overlap"))
        assert logged == rt.stats.skips[("j", "overlap")]

    async def test_a_job_that_skips_every_other_tick_logs_once_per_interval(
        self, rt: Runtime, logs, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A burst: on time for one tick, late for the next. An on-time tick does not end
        the span, or this would be a line per skip again."""
        monkeypatch.setattr(skips_module, "REPORT_EVERY", 1.0)
        count = 0

        async def every_other_slow(ctx: Any) -> None:
            nonlocal count
            count += 1
            if count % 2:
                await asyncio.sleep(0.07)  # past the next tick: it is skipped

        job = ScheduledJob(make_spec(every_other_slow, every=0.05), rt, cursor=None)
        started = time.monotonic()
        job.start()
        await wait_until(lambda: rt.stats.skips[("j", "overlap")] >= 10, timeout=10)
        lines = skips(logs, "overlap")
        assert lines[0]["count"] == 1
        # The first at once, then at most one a REPORT_EVERY (not one per skip).
        assert len(lines) <= 1 + (time.monotonic() - started) / 1.0, lines
        await stop(job, rt)
        lines = skips(logs, "overlap")
        assert sum(line["count"] for line in lines) == rt.stats.skips[("j", "overlap")]


class TestOneTimerPerTick:
    """The timer armed when an inline run starts is the one the job sleeps on after it."""

    async def test_the_sleep_after_a_run_reuses_the_run_s_timer(self, rt: Runtime, logs) -> None:
        armed: list[object] = []
        job: ScheduledJob

        async def record(ctx: Any) -> None:
            armed.append(job._timer)  # armed for the next tick when the run started
            await asyncio.sleep(0.01)

        job = ScheduledJob(make_spec(record, every=0.2), rt, cursor=None)
        job.start()
        await wait_until(lambda: len(runs(logs)) >= 1)
        await wait_until(lambda: job._wake is not None and not job._wake.done())
        assert armed[0] is not None
        assert job._timer is armed[0]  # not cancelled and armed again
        await stop(job, rt)
