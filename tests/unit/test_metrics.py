"""Metrics in-process: known runs, skips, retries and a worker crash through a real Runtime and
JobSet, scraped with prometheus_client's own text parser; the sink's buckets at their edges."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from taskd._version import __version__
from taskd.errors import WorkerDied
from taskd.jobspec import JobSpec
from taskd.ledger import NULL_LEDGER
from taskd.observe.metrics import BUCKETS, DaemonCollector, MetricsSink, sink_of
from taskd.observe.process import ProcessFigures
from taskd.run.events import Cause, Outcome
from taskd.run.runner import RunInfo
from taskd.run.runtime import Runtime
from taskd.run.sinks import RunEnd
from taskd.schedule.jobset import JobSet
from taskd.schedule.manual import ManualRun
from taskd.schedule.triggers import Every
from taskd.state.store import JobRow
from tests.unit.procpool_funcs import jobs as pool_jobs
from tests.unit.test_scheduler import make_spec, wait_until

pytestmark = pytest.mark.timeout(30)
# Hourly ticks half an hour either side of now: no tick falls due while a test runs, and the
# newest missed one is far older than grace (ticks on the hour made these tests fail when a
# run began in the first minute of an hour: slow's tick was within grace and ran).
HOURLY = Every(3600.0, anchor=time.time() + 1800)
MISSED_3 = HOURLY.anchor - 4 * 3600  # an hourly job last ran 3 ticks ago

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FakeDaemon:
    """What taskd.daemon.Daemon offers the metrics, /healthz and the page, and nothing more."""

    def __init__(self, rt: Runtime | None, jobset: JobSet | None) -> None:
        self.rt = rt
        self.jobset = jobset
        self.reloader = SimpleNamespace(last=None)
        self.loopwatch: Any = None
        self.loaded = None
        self.store = None
        self.control = None
        self.fleet = None  # no fleet job
        self.stopping = False
        self.started_at = time.time() - 60
        self.config_path = Path("/etc/taskd/taskd.toml")

    @property
    def loop_name(self) -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]


def parse(text: str | bytes) -> tuple[dict[str, Any], Samples]:
    """(families by name, every sample by (name, labels)), as a Prometheus server reads them."""
    if isinstance(text, bytes):
        text = text.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples
    }
    return families, samples


def of(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def jobs_in(samples: Samples) -> set[str]:
    return {dict(labels)["job_name"] for _, labels in samples if "job_name" in dict(labels)}


async def ok(ctx: Any) -> str:
    return "ok"


async def boom(ctx: Any) -> None:
    raise ValueError("boom")


async def slow(ctx: Any) -> None:
    await asyncio.sleep(30)


def hourly(func: Any, **cfg: Any) -> JobSpec:
    return dataclasses.replace(make_spec(func, every=3600.0, **cfg), trigger=HOURLY)


def specs(*names: str) -> dict[str, JobSpec]:
    made = {
        "ok": hourly(ok, name="ok"),
        "bad": hourly(boom, name="bad", retries=1, retry_backoff=0.01),
        "slow": hourly(slow, name="slow", catchup="none"),
    }
    return {n: made[n] for n in names}


async def trigger(jobs: JobSet, name: str) -> RunInfo:
    manual = ManualRun()
    assert jobs.trigger(name, manual) is None
    info = await asyncio.wait_for(manual.ended, 5)
    assert isinstance(info, RunInfo)
    return info


@pytest.fixture
async def daemon(rt: Runtime) -> AsyncIterator[FakeDaemon]:
    """A Runtime and JobSet (ok, bad, slow; hourly, so only manual runs) with a MetricsSink.
    slow was last run 3 h ago and does not catch up: its 3 missed ticks are skips."""
    jobs = JobSet(rt)
    sink_of(rt)
    with capture_logs():
        jobs.apply(specs("ok", "bad", "slow"), {"slow": JobRow("slow", last_tick=MISSED_3)})
        yield FakeDaemon(rt, jobs)
        for job in jobs.everyone():
            job.stop()
            job.cancel_runs("test over")
        tasks = jobs.tasks()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await rt.close(kill=True)


async def known_runs(d: FakeDaemon) -> None:
    """ok: 3 successes; bad: 1 failed run after 1 retry; slow: 1 cancelled (and 3 skips)."""
    jobs, rt = d.jobset, d.rt
    assert jobs is not None and rt is not None
    for _ in range(3):
        assert (await trigger(jobs, "ok")).outcome is Outcome.SUCCEEDED
    assert (await trigger(jobs, "bad")).outcome is Outcome.FAILED
    manual = ManualRun()
    assert jobs.trigger("slow", manual) is None
    await asyncio.wait_for(manual.started, 5)
    jobs.get("slow").cancel_runs("test")
    info = await asyncio.wait_for(manual.ended, 5)
    assert isinstance(info, RunInfo) and info.outcome is Outcome.CANCELLED
    await rt.settle()


def collector(d: FakeDaemon) -> DaemonCollector:
    assert d.rt is not None
    return DaemonCollector(d, sink_of(d.rt))


class TestFamilies:
    """After known runs, every family has the values the runs imply."""

    async def test_runs_skips_retries_by_job(self, daemon: FakeDaemon) -> None:
        await known_runs(daemon)
        families, s = parse(collector(daemon).exposition())
        assert families["taskd_runs"].type == "counter"
        expected = {
            ("ok", "succeeded"): 3,
            ("bad", "failed"): 1,
            ("slow", "cancelled"): 1,
        }
        for job in ("ok", "bad", "slow"):
            for outcome in ("succeeded", "failed", "timed_out", "cancelled"):
                value = of(s, "taskd_runs_total", job_name=job, outcome=outcome)
                assert value == expected.get((job, outcome), 0), (job, outcome)
        assert of(s, "taskd_retries_total", job_name="bad") == 1
        assert of(s, "taskd_retries_total", job_name="ok") == 0
        assert [(dict(k[1]), v) for k, v in s.items() if k[0] == "taskd_skips_total"] == [
            ({"job_name": "slow", "reason": "missed"}, 3)
        ]
        assert of(s, "taskd_runs_in_flight") == 0
        assert of(s, "taskd_stuck_threads") == 0

    async def test_histograms_count_every_ended_run(self, daemon: FakeDaemon) -> None:
        await known_runs(daemon)
        families, s = parse(collector(daemon).exposition())
        for family in ("taskd_run_duration_seconds", "taskd_run_lateness_seconds"):
            assert families[family].type == "histogram"
            for job, n in (("ok", 3), ("bad", 1), ("slow", 1)):
                assert of(s, f"{family}_count", job_name=job) == n
                assert of(s, f"{family}_bucket", job_name=job, le="+Inf") == n
                bounds = [
                    of(s, f"{family}_bucket", job_name=job, le=le)
                    for le in (*(repr(b) for b in BUCKETS), "+Inf")
                ]
                assert bounds == sorted(bounds)  # cumulative
        # ok runs in well under 5 ms; bad waited 10 ms for its retry.
        assert of(s, "taskd_run_duration_seconds_bucket", job_name="ok", le="0.005") == 3
        assert of(s, "taskd_run_duration_seconds_bucket", job_name="bad", le="0.01") == 0
        assert of(s, "taskd_run_duration_seconds_bucket", job_name="bad", le="0.05") == 1
        assert 0.01 <= (of(s, "taskd_run_duration_seconds_sum", job_name="bad") or 0) < 0.05
        assert of(s, "taskd_run_lateness_seconds_bucket", job_name="ok", le="0.05") == 3

    async def test_next_run_and_last_success(self, daemon: FakeDaemon) -> None:
        before = time.time()
        await known_runs(daemon)
        _, s = parse(collector(daemon).exposition())
        assert before <= (of(s, "taskd_job_last_success_timestamp_seconds", job_name="ok") or 0)
        assert of(s, "taskd_job_last_success_timestamp_seconds", job_name="bad") is None
        for job in ("ok", "bad", "slow"):
            when = of(s, "taskd_job_next_run_timestamp_seconds", job_name=job)
            assert when is not None and before < when <= time.time() + 3600
        assert daemon.jobset is not None
        daemon.jobset.set_paused("ok", True)
        _, s = parse(collector(daemon).exposition())
        assert of(s, "taskd_job_next_run_timestamp_seconds", job_name="ok") is None  # paused

    async def test_removed_job_series_disappear(self, daemon: FakeDaemon) -> None:
        await known_runs(daemon)
        c = collector(daemon)
        assert jobs_in(parse(c.exposition())[1]) == {"ok", "bad", "slow"}
        assert daemon.jobset is not None
        daemon.jobset.apply(specs("ok"), {})
        _, s = parse(c.exposition())
        assert jobs_in(s) == {"ok"}
        assert set(c.sink.jobs) == {"ok"}  # its histograms are dropped, not only hidden

    async def test_daemon_wide_families(self, daemon: FakeDaemon) -> None:
        _, s = parse(collector(daemon).exposition())
        info = [dict(k[1]) for k in s if k[0] == "taskd_build_info"]
        assert len(info) == 1 and info[0]["version"] == __version__
        assert info[0]["loop"] in ("asyncio", "uvloop") and info[0]["python"]
        assert of(s, "taskd_reload_last_success") == 1
        assert of(s, "taskd_reload_last_timestamp_seconds") == daemon.started_at
        assert (of(s, "taskd_process_resident_memory_bytes", process="daemon") or 0) > 1e6
        assert (of(s, "taskd_process_open_fds", process="daemon") or 0) > 2
        assert (of(s, "taskd_process_cpu_seconds_total", process="daemon") or 0) > 0
        assert of(s, "taskd_process_resident_memory_bytes", process="workers") == 0
        for cause in ("died", "timeout", "memory", "start_failed"):
            assert of(s, "taskd_worker_restarts_total", cause=cause) == 0
        assert of(s, "taskd_event_loop_lag_seconds") == 0  # no loop watch: zeros
        assert of(s, "taskd_event_loop_blocked_total") == 0

        daemon.reloader.last = SimpleNamespace(ok=False, at=123.5, errors=("x",))
        daemon.loopwatch = SimpleNamespace(
            lag=0.002,
            lag_max=0.4,
            blocked_total=2,
            lag_sum=0.5,
            lag_histogram=lambda: [(0.001, 3), (0.25, 9), (math.inf, 10)],
        )
        _, s = parse(collector(daemon).exposition())
        assert of(s, "taskd_reload_last_success") == 0
        assert of(s, "taskd_reload_last_timestamp_seconds") == 123.5
        assert of(s, "taskd_event_loop_lag_seconds") == 0.002
        assert of(s, "taskd_event_loop_lag_max_seconds") == 0.4
        assert of(s, "taskd_event_loop_blocked_total") == 2
        assert of(s, "taskd_event_loop_probe_lag_seconds_bucket", le="0.25") == 9
        assert of(s, "taskd_event_loop_probe_lag_seconds_count") == 10

    async def test_before_the_jobs_exist(self) -> None:
        """The server may answer while the daemon is starting: families, no job series."""
        families, s = parse(DaemonCollector(FakeDaemon(None, None), MetricsSink()).exposition())
        assert "taskd_runs" in families and "taskd_run_duration_seconds" in families
        assert jobs_in(s) == set()
        assert of(s, "taskd_runs_in_flight") == 0

    async def test_registry_matches_exposition(self, daemon: FakeDaemon) -> None:
        """/metrics writes the per-job families itself: a prometheus_client registry holding
        the collector must say the same thing."""
        await known_runs(daemon)
        c = collector(daemon)
        registry = CollectorRegistry()
        registry.register(c)

        def stable(samples: Samples) -> Samples:  # CPU time moves between two scrapes
            return {k: v for k, v in samples.items() if not k[0].startswith("taskd_process")}

        families, served = parse(c.exposition())
        families2, via_registry = parse(generate_latest(registry))
        assert stable(served) == stable(via_registry)
        assert {n: f.type for n, f in families.items()} == {n: f.type for n, f in families2.items()}
        assert {n: f.documentation for n, f in families.items()} == {
            n: f.documentation for n, f in families2.items()
        }


class TestSink:
    """MetricsSink files each run into the right bucket: le is inclusive, +Inf catches all."""

    def end(self, duration: float, late: float) -> RunEnd:
        spec = make_spec(ok, name="j")
        info = RunInfo("r1", "j", scheduled=1000.0, started=1000.0 + late, cause=Cause.SCHEDULE)
        info.outcome, info.ended = Outcome.SUCCEEDED, info.started + duration
        return RunEnd.of(spec, info, NULL_LEDGER)

    @pytest.mark.parametrize(
        ("duration", "bucket"),
        [
            (0.0, 0),
            (0.001, 0),  # on the bound: that bucket
            (0.0011, 1),
            (3600.0, len(BUCKETS) - 1),
            (3600.5, len(BUCKETS)),  # +Inf
            (-2.0, 0),  # a clock step backwards counts as 0, never a negative sum
        ],
    )
    def test_bucket_edges(self, duration: float, bucket: int) -> None:
        sink = MetricsSink()
        sink.run_ended(self.end(duration, late=duration))
        h = sink.jobs["j"]
        assert [i for i, n in enumerate(h.duration) if n] == [bucket]
        assert h.duration == h.lateness
        assert h.duration_sum == pytest.approx(max(duration, 0.0), abs=1e-6)

    def test_retain_drops_other_jobs(self) -> None:
        sink = MetricsSink()
        sink.run_ended(self.end(0.1, 0.0))
        sink.retain(["other"])
        assert sink.jobs == {}

    def test_sink_of_adds_one_sink_once(self, rt: Runtime) -> None:
        assert sink_of(rt) is sink_of(rt)
        assert sum(isinstance(s, MetricsSink) for s in rt.sinks) == 1


class TestWorkers:
    """The process pool's workers: restarts by cause, and their processes' figures."""

    async def test_worker_crash_is_counted_as_died(self, rt: Runtime) -> None:
        d = FakeDaemon(rt, JobSet(rt))
        try:
            pool = await rt.procs()
            c = collector(d)
            _, s = parse(c.exposition())
            assert (of(s, "taskd_process_resident_memory_bytes", process="workers") or 0) > 1e6
            cpu_before = of(s, "taskd_process_cpu_seconds_total", process="workers")
            with pytest.raises(WorkerDied):
                await pool.run(pool_jobs.exit_now, (3,))
            await wait_until(lambda: pool.restarts["died"] == 1 and pool.size == 1)
            _, s = parse(c.exposition())
            assert of(s, "taskd_worker_restarts_total", cause="died") == 1
            assert of(s, "taskd_worker_restarts_total", cause="timeout") == 0
            assert (of(s, "taskd_process_open_fds", process="workers") or 0) > 0
            cpu = of(s, "taskd_process_cpu_seconds_total", process="workers")
            assert cpu is not None and cpu_before is not None and cpu >= cpu_before
            assert await pool.run(pool_jobs.add, (1, 2)) == 3
        finally:
            await rt.close(kill=True)

    def test_cpu_of_a_gone_worker_is_kept(self) -> None:
        """A counter must not go down when a worker is replaced."""
        figures = ProcessFigures()
        _, cpu, _ = figures.pool([os.getpid()])  # any live process will do
        assert cpu > 0
        rss, after, fds = figures.pool([])
        assert (rss, fds) == (0, 0)
        assert after == cpu
