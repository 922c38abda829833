"""Prometheus metrics: a run-end sink for the histograms, and a collector that reads the rest
from the daemon's own counters at scrape time.

Nothing here runs per run except :meth:`MetricsSink.run_ended` (a bisect and a few list
increments); everything else is built when Prometheus scrapes. Label values are job names,
outcomes, skip reasons and restart causes, so the number of series is bounded by the number
of configured jobs: a job a reload removed is gone from the next scrape.

The per-job families (about 42 series per job that has run) are written as exposition text
directly: prometheus_client's ``generate_latest`` costs ~5 us per series, so a scrape of 1,000
jobs would hold the event loop for a quarter of a second; the direct writer is ~10x cheaper.
The few daemon-wide families go through prometheus_client as usual.

Imported only when ``daemon.metrics_address`` is set (prometheus_client is not free to
import)."""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from taskd._version import __version__
from taskd.observe.process import ProcessFigures
from taskd.run.events import Outcome
from taskd.schedule.jobset import _next_run

if TYPE_CHECKING:
    from taskd.daemon import Daemon
    from taskd.run.runtime import Runtime
    from taskd.run.sinks import RunEnd

# Upper bounds (seconds) of the duration and lateness buckets: from a 1 ms io job to an hourly
# backup, roughly 1-5-10 per decade, with the minutes that schedules use.
BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
)
_go_float: Callable[[float], str] = floatToGoString  # untyped upstream; how it writes "le"
_LE = (*(_go_float(b) for b in BUCKETS), "+Inf")
# The outcomes an ended run can have; each job exports all four, zeros included, so that
# rate() and alerts see a series before the first failure.
END_OUTCOMES = (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.TIMED_OUT, Outcome.CANCELLED)
RESTART_CAUSES = (
    "died",
    "killed",
    "timeout",
    "memory",
    "start_failed",
)  # ProcessPool.restarts keys
# The label that names a job. Not "job": Prometheus gives every series the scrape job's name
# under "job" and would rename ours to "exported_job" (kube-state-metrics says job_name too).
JOB_LABEL = "job_name"
# Jobs' worth of lines per piece of a scrape (~10 ms of work); see DaemonCollector.job_pieces.
PIECE = 1000


class JobHistograms:
    """One job's duration and lateness observations: per-bucket (not cumulative) counts, the
    last slot being +Inf, and the sums."""

    __slots__ = ("duration", "duration_sum", "lateness", "lateness_sum")

    def __init__(self) -> None:
        self.duration = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self.lateness = [0] * (len(BUCKETS) + 1)
        self.lateness_sum = 0.0


class MetricsSink:
    """A run sink (taskd.run.sinks) that files each ended run's duration and lateness into
    its job's buckets. On the loop thread, once per run: no locks, no prometheus objects."""

    __slots__ = ("jobs",)

    def __init__(self) -> None:
        self.jobs: dict[str, JobHistograms] = {}

    def run_ended(self, end: RunEnd) -> None:
        name = end.spec.config.name
        h = self.jobs.get(name)
        if h is None:
            h = self.jobs[name] = JobHistograms()
        # Wall-clock differences: a clock step can make them negative, and a histogram's sum
        # must never go down (rate() would read a reset).
        duration = end.duration if end.duration > 0.0 else 0.0
        info = end.info
        late = info.started - info.scheduled
        if late < 0.0:
            late = 0.0
        # bisect_left: a value equal to a bound belongs to that bucket (le is "<=").
        h.duration[bisect_left(BUCKETS, duration)] += 1
        h.duration_sum += duration
        h.lateness[bisect_left(BUCKETS, late)] += 1
        h.lateness_sum += late

    def retain(self, names: Iterable[str]) -> None:
        """Forget the jobs not in ``names`` (removed by a reload), so memory and series stay
        bounded by the configured jobs."""
        keep = names if isinstance(names, Mapping | set | frozenset) else set(names)
        for name in [n for n in self.jobs if n not in keep]:
            del self.jobs[name]


def sink_of(rt: Runtime, new: MetricsSink | None = None) -> MetricsSink:
    """The runtime's MetricsSink: the one among its sinks, else ``new`` (or a fresh one)
    added to them. One per runtime, so no run is counted twice."""
    for sink in rt.sinks:
        if isinstance(sink, MetricsSink):
            return sink
    sink = new if new is not None else MetricsSink()
    rt.sinks.append(sink)
    return sink


class DaemonCollector:
    """Every taskd family for one daemon, built at scrape time from the daemon's own counters
    (taskd.run.runtime.Stats, the job table, the process pool, the reloader, the loop watch)
    and the sink's histograms. Call on the loop thread: it reads live state without locks.

    :meth:`exposition` is what /metrics serves; :meth:`collect` yields the same families as
    prometheus_client objects, so the collector can sit in a ``CollectorRegistry``."""

    def __init__(self, daemon: Daemon, sink: MetricsSink) -> None:
        self.daemon = daemon
        self.sink = sink
        self.processes = ProcessFigures()
        self._python = platform.python_version()
        self._fixed = _Families(self.daemon_families)

    def exposition(self) -> bytes:
        """The whole scrape in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
        return self.job_text().encode() + self.daemon_text()

    def daemon_text(self) -> bytes:
        """The daemon-wide families (:meth:`daemon_families`) as exposition text."""
        return generate_latest(self._fixed)

    def collect(self) -> Iterator[Metric]:
        yield from text_string_to_metric_families(self.job_text())
        yield from self.daemon_families()

    # -- per job: written as text ----------------------------------------------------------

    def job_text(self) -> str:
        """The per-job families as exposition text, for the configured jobs only."""
        return "".join(self.job_pieces())

    def job_pieces(self) -> Iterator[str]:
        """:meth:`job_text` in pieces of about PIECE jobs' lines each. A caller on the loop
        may let other callbacks run between pieces (runs may end meanwhile: a scrape is not
        a snapshot, and need not be)."""
        buf: list[str] = []
        for text in self._job_lines():
            buf.append(text)
            if len(buf) >= PIECE:
                yield "".join(buf)
                buf.clear()
        if buf:
            yield "".join(buf)

    def _job_lines(self) -> Iterator[str]:
        """Each family's header, then one string per job (its lines of that family)."""
        d = self.daemon
        rt, jobset = d.rt, d.jobset
        if rt is None or jobset is None:  # starting: the families, without series yet
            for family in _JOB_FAMILIES:
                yield _header(*family)
            return
        current = jobset.jobs
        names = sorted(current)
        labels = {name: f'{JOB_LABEL}="{_escape(name)}"' for name in names}
        stats = rt.stats
        self.sink.retain(current)
        yield _header(*_JOB_FAMILIES[0])
        outcomes = stats.outcomes
        for name in names:
            job = labels[name]
            yield "".join(
                f'taskd_runs_total{{{job},outcome="{outcome}"}} '
                f"{outcomes.get((name, outcome), 0)}.0\n"
                for outcome in END_OUTCOMES
            )
        for head, lateness in ((_JOB_FAMILIES[1], False), (_JOB_FAMILIES[2], True)):
            yield _header(*head)
            metric = head[0]
            hists = self.sink.jobs
            for name in names:
                h = hists.get(name)
                if h is None:  # no run ended since the daemon started
                    continue
                counts = h.lateness if lateness else h.duration
                total_sum = h.lateness_sum if lateness else h.duration_sum
                job = labels[name]
                lines = []
                total = 0
                for le, n in zip(_LE, counts, strict=True):
                    total += n
                    lines.append(f'{metric}_bucket{{{job},le="{le}"}} {total}.0\n')
                lines.append(f"{metric}_count{{{job}}} {total}.0\n")
                lines.append(f"{metric}_sum{{{job}}} {total_sum!r}\n")
                yield "".join(lines)
        yield _header(*_JOB_FAMILIES[3])
        for (name, reason), n in sorted(stats.skips.items()):
            if name in labels:  # a configured job (skips of removed ones stay in the Counter)
                text = f'{labels[name]},reason="{_escape(reason)}"'
                yield f"taskd_skips_total{{{text}}} {n}.0\n"
        yield _header(*_JOB_FAMILIES[4])
        retries = stats.retries
        for name in names:
            yield f"taskd_retries_total{{{labels[name]}}} {retries.get(name, 0)}.0\n"
        yield _header(*_JOB_FAMILIES[5])
        now = time.time()
        for name in names:
            scheduled = current.get(name)  # a reload between pieces may have removed it
            when = _next_run(scheduled, now) if scheduled is not None else None
            if when is not None:
                yield f"taskd_job_next_run_timestamp_seconds{{{labels[name]}}} {when!r}\n"
        yield _header(*_JOB_FAMILIES[6])
        last_success = stats.last_success
        for name in names:
            ended = last_success.get(name)
            if ended is not None:
                job = labels[name]
                yield f"taskd_job_last_success_timestamp_seconds{{{job}}} {ended!r}\n"

    # -- daemon-wide: prometheus_client objects --------------------------------------------

    def daemon_families(self) -> Iterator[Metric]:
        """The families with a handful of series each (no per-job labels)."""
        d = self.daemon
        rt = d.rt
        watch = getattr(d, "loopwatch", None)  # absent or None: no loop watch (yet)
        last = d.reloader.last if d.reloader is not None else None
        yield _gauge(
            "taskd_runs_in_flight",
            "Runs going now (waits between retries included).",
            rt.stats.running if rt is not None else 0,
        )
        yield _gauge(
            "taskd_stuck_threads",
            "Threads of blocking runs that outlived their timeout and cannot be stopped.",
            rt.threads.stuck_count if rt is not None else 0,
        )
        yield _gauge(
            "taskd_thread_pool_exhausted",
            "1 while every thread daemon.thread_workers_max allows is stuck (blocking runs "
            "are skipped as exhausted), else 0.",
            1.0 if rt is not None and rt.threads.exhausted else 0.0,
        )
        yield _gauge(
            "taskd_thread_pool_threads",
            "Threads of the blocking pool (stuck ones included); at most thread_workers_max.",
            rt.threads.status().alive if rt is not None else 0,
        )
        yield _gauge(
            "taskd_event_loop_lag_seconds",
            "How late the event loop ran its latest lag probe (a timed callback).",
            float(getattr(watch, "lag", 0.0)),
        )
        yield _gauge(
            "taskd_event_loop_lag_max_seconds",
            "The largest event-loop lag measured recently.",
            float(getattr(watch, "lag_max", 0.0)),
        )
        yield from _lag_histogram(watch)
        if rt is not None:
            yield from _executor_families(rt.executors.gauges())
        blocked = CounterMetricFamily(
            "taskd_event_loop_blocked",
            "Times the event loop was blocked past daemon.loop_block_threshold (each logged).",
        )
        blocked.add_metric([], int(getattr(watch, "blocked_total", 0)))
        yield blocked
        yield _gauge(
            "taskd_reload_last_success",
            "Whether the last config reload succeeded (1) or was rejected (0); 1 before any.",
            1.0 if last is None or last.ok else 0.0,
        )
        yield _gauge(
            "taskd_reload_last_timestamp_seconds",
            "When the last config reload started (Unix time); the daemon's start before any.",
            last.at if last is not None else d.started_at,
        )
        info = GaugeMetricFamily(
            "taskd_build_info",
            "Always 1; the labels say which taskd, Python and event loop.",
            labels=["version", "python", "loop"],
        )
        info.add_metric([__version__, self._python, _loop_name(d)], 1.0)
        yield info
        yield from self._process()

    def _process(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily(
            "taskd_process_resident_memory_bytes",
            "Resident memory of the daemon, and summed over the process pool's workers.",
            labels=["process"],
        )
        cpu = CounterMetricFamily(
            "taskd_process_cpu_seconds",
            "CPU time (user + system) of the daemon, and of the pool's workers (replaced "
            "workers included).",
            labels=["process"],
        )
        fds = GaugeMetricFamily(
            "taskd_process_open_fds",
            "Open file descriptors of the daemon, and summed over the pool's workers.",
            labels=["process"],
        )
        restarts = CounterMetricFamily(
            "taskd_worker_restarts",
            "Process-pool workers replaced, by cause: died (crashed, exited, killed from "
            "outside), killed (by taskd: its run was cancelled), timeout, memory (past "
            "max_memory), start_failed.",
            labels=["cause"],
        )
        figures = self.processes
        rt = self.daemon.rt
        pool = rt.started_procs if rt is not None else None  # None until a cpu job needs it
        for label, (r, c, f) in (
            ("daemon", figures.daemon()),
            ("workers", figures.pool(pool.pids() if pool is not None else ())),
        ):
            rss.add_metric([label], r)
            cpu.add_metric([label], c)
            fds.add_metric([label], f)
        counts: Mapping[str, int] = pool.restarts if pool is not None else {}
        for cause in (*RESTART_CAUSES, *sorted(set(counts) - set(RESTART_CAUSES))):
            restarts.add_metric([cause], counts.get(cause, 0))
        yield from (rss, cpu, fds, restarts)


# (name as exposed, type, help) of the per-job families, in the order job_text writes them.
_JOB_FAMILIES = (
    ("taskd_runs_total", "counter", "Runs ended, by job and outcome."),
    (
        "taskd_run_duration_seconds",
        "histogram",
        "How long runs took, by job (all attempts and the waits between them).",
    ),
    (
        "taskd_run_lateness_seconds",
        "histogram",
        "How long after its tick (or its trigger) each run started, by job.",
    ),
    ("taskd_skips_total", "counter", "Ticks that did not become runs, by job and reason."),
    ("taskd_retries_total", "counter", "Failed attempts that were retried, by job."),
    (
        "taskd_job_next_run_timestamp_seconds",
        "gauge",
        "When each job runs next on its schedule (Unix time); absent when it will not "
        "(paused, broken, an `at` in the past).",
    ),
    (
        "taskd_job_last_success_timestamp_seconds",
        "gauge",
        "When each job's latest successful run ended (Unix time); absent until one has.",
    ),
)


class _Families:
    """A Collector over a generator function, for generate_latest."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self.collect = families


def _header(name: str, kind: str, text: str) -> str:
    return f"# HELP {name} {text}\n# TYPE {name} {kind}\n"


def _escape(value: str) -> str:
    """A label value as the text format wants it. Job names cannot need it (letters, digits,
    - _ .), but a plugin's skip reason might."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _lag_histogram(watch: object) -> Iterator[Metric]:
    hist = HistogramMetricFamily(
        "taskd_event_loop_probe_lag_seconds",
        "How late each of the loop watch's lag probes ran: the event loop's responsiveness.",
        labels=[],
    )
    pairs = getattr(watch, "lag_histogram", None)
    if pairs is not None:
        buckets = [(_go_float(bound), float(n)) for bound, n in pairs()]
        hist.add_metric([], buckets, float(getattr(watch, "lag_sum", 0.0)))
    yield hist


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _loop_name(daemon: Daemon) -> str:
    try:
        return daemon.loop_name
    except RuntimeError:  # scraped outside the loop (a test, a thread)
        return "unknown"


def _executor_families(gauges: Mapping[str, Mapping[str, float]]) -> Iterator[Metric]:
    """taskd_<executor>_<name> for each figure of an executor made (started or not) other
    than the built-in pools (which have families of their own): taskd_dask_workers, say.
    A name ending in ``_total`` is a counter (taskd_dask_orphaned_total)."""
    for executor, figures in gauges.items():
        if executor in ("thread", "process"):
            continue
        for name, value in figures.items():
            what = f"The {executor} executor's {name.removesuffix('_total')}."
            if name.endswith("_total"):
                counter = CounterMetricFamily(
                    f"taskd_{executor}_{name.removesuffix('_total')}", what
                )
                counter.add_metric([], value)
                yield counter
            else:
                yield _gauge(f"taskd_{executor}_{name}", what, value)
