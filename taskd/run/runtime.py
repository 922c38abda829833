"""Runtime: the services every run uses (pools, state, ledger, hooks, counters), in one place."""

from __future__ import annotations

import asyncio
import os
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from taskd.ledger import NULL_LEDGER, NoFleetLedger
from taskd.run.events import EventKind, JobEvent, Outcome
from taskd.run.executor._base import ExecutorSettings
from taskd.run.executor.live import Executors
from taskd.run.executor.registry import ExecutorType
from taskd.run.resources import Resources
from taskd.run.sinks import RunSink, default_sinks

# Why fleet jobs do not run while no fleet ledger has taken the runtime's "fleet" slot.
NO_FLEET = "this daemon has no connection to the fleet's database (taskd.fleet)"

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from taskd.ledger import Ledger
    from taskd.plugin.manager import PluginHost
    from taskd.run.pool import ProcessPool
    from taskd.state.shared import SharedState
    from taskd.state.store import JobRow

T = TypeVar("T")
RECENT_FAILURES = 50
SUCCEEDED = Outcome.SUCCEEDED
FAILED_OUTCOMES = frozenset(o for o in Outcome if o.failed)


@dataclass(slots=True)  # not frozen: one is made per run, and a frozen init costs 4x
class LastRun:
    """A job's latest ended run, as ``taskd jobs`` shows it."""

    job: str
    run_id: str
    outcome: Outcome
    started: float
    duration: float | None
    error: str | None


class Stats:
    """Counters and each job's latest run, which ``taskd status`` (and later /metrics) read."""

    __slots__ = (
        "failures",
        "last",
        "last_success",
        "outcomes",
        "recent_failures",
        "retries",
        "running",
        "skips",
    )

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.skips: Counter[tuple[str, str]] = Counter()
        self.retries: Counter[str] = Counter()  # by job
        self.running = 0
        self.last: dict[str, LastRun] = {}
        self.last_success: dict[str, float] = {}  # when each job's latest success ended
        self.failures: dict[str, int] = {}  # consecutive failed runs, per job that has any
        # The newest failed runs (status page): a ring, so memory stays bounded.
        self.recent_failures: deque[LastRun] = deque(maxlen=RECENT_FAILURES)

    def seed(self, rows: Mapping[str, JobRow]) -> None:
        """The latest runs as stored by the previous daemon (not counted again)."""
        for name, row in rows.items():
            if row.last_run_id is not None and row.last_outcome is not None:
                self.last[name] = LastRun(
                    name,
                    row.last_run_id,
                    Outcome(row.last_outcome),
                    row.last_started or 0.0,
                    row.last_duration,
                    row.last_error,
                )
            if row.last_success is not None:
                # Kept across restarts, so "has not succeeded in X" alerts go on firing for a
                # job that keeps failing after one.
                self.last_success[name] = row.last_success
            if row.failures:
                self.failures[name] = row.failures

    def forget(self, jobs: Iterable[str]) -> None:
        """Drop what is kept per job for jobs no longer configured."""
        gone = set(jobs)
        if not gone:
            return
        for per_job in (self.last, self.last_success, self.failures, self.retries):
            for name in gone:
                per_job.pop(name, None)
        for counter in (self.outcomes, self.skips):
            for key in [k for k in counter if k[0] in gone]:
                del counter[key]

    def record(
        self,
        job: str,
        run_id: str,
        outcome: Outcome,
        started: float,
        duration: float | None,
        error: str | None,
    ) -> int:
        """Count an ended run; returns the job's consecutive failures, this run included.
        A cancelled run neither breaks nor extends a streak."""
        self.outcomes[(job, outcome)] += 1
        last = self.last[job] = LastRun(job, run_id, outcome, started, duration, error)
        failures = self.failures.get(job, 0)
        if outcome is not SUCCEEDED and outcome in FAILED_OUTCOMES:  # not .failed: per run
            failures += 1
            self.recent_failures.append(last)
        elif outcome is SUCCEEDED:
            failures = 0
            self.last_success[job] = started + (duration or 0.0)
        if failures:
            self.failures[job] = failures
        else:
            self.failures.pop(job, None)
        return failures


class Runtime:
    def __init__(
        self,
        *,
        shared: SharedState,
        host: PluginHost,
        thread_workers: int,
        process_workers: int,
        max_result_size: int = 1 << 20,
        thread_workers_max: int = 0,
        ledger: Ledger = NULL_LEDGER,
        executor_tables: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.shared = shared
        # Where ticks and runs go on record (taskd.ledger), by a job's scope: the only write
        # path from the scheduler and the runner. Each job holds its own (JobState.ledger),
        # so no run looks its scope up. The daemon keeps the store itself for its reads.
        # Fleet jobs are refused (fleet_unavailable) until a fleet ledger takes "fleet".
        self.ledgers: dict[str, Ledger] = {"host": ledger, "fleet": NoFleetLedger(ledger, NO_FLEET)}
        self.host = host
        self.process_workers = process_workers or (os.cpu_count() or 1)
        # The config's executor tables ([dask], [executors.<name>]) by table name: read when
        # an executor is made, so a reload's change applies from the next daemon start.
        self.executor_tables: Mapping[str, Mapping[str, Any]] = executor_tables or {}

        def settings(kind: ExecutorType) -> ExecutorSettings:
            return ExecutorSettings(
                table=self.executor_tables.get(kind.table, {}),
                thread_workers=thread_workers,
                thread_workers_max=thread_workers_max,
                process_workers=self.process_workers,
            )

        # Where blocking and cpu runs go (taskd.run.executor): the thread pool and the
        # process pool are the built-ins, read directly on their kinds' default paths.
        self.executors = Executors(host.executors, settings)
        self.process = self.executors.process
        self.threads = self.executors.thread.runner
        # [daemon] max_result_size; a reload sets it anew.
        self.max_result_size = max_result_size
        self.stats = Stats()
        self.log: FilteringBoundLogger = structlog.get_logger("taskd.run").bind()
        # io jobs' long-lived resources (ctx.resource): a reload retires a changed or removed
        # job's, the stop closes the rest.
        self.resources = Resources(self.log)
        self._deferred = 0
        self.stopping = False
        # 40 random bits per daemon start: run ids must not collide across restarts (the
        # history is keyed by them).
        self._prefix = os.urandom(5).hex()
        self._seq = 0
        self.listeners = host.has_impls("taskd_job_event")
        self._tasks: set[asyncio.Task[Any]] = set()
        # Where each ended run goes (log, ledger, shared state, stats, hooks): see sinks.py.
        self.sinks: list[RunSink] = default_sinks(self)

    def fleet_state(self, job: str, fence: int) -> SharedState:
        """``ctx.state`` of a fleet run (one with a fence): the fleet ledger's fenced state
        (taskd.fleet.state), or this host's while no fleet ledger is in place."""
        make = getattr(self.ledgers["fleet"], "state_for", None)
        state: SharedState = self.shared if make is None else make(job, fence)
        return state

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task with a strong reference kept until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def refresh_log(self) -> None:
        """Pick up a new logging configuration (a reload changed log_level/log_format).

        The logger is a concrete one, not structlog's lazy proxy, which would re-resolve the
        configuration on every call of the hot path."""
        self.log = structlog.get_logger("taskd.run").bind()
        self.resources.log = self.log

    def defer(self, fn: Callable[..., None], /, *args: Any) -> None:
        """Call ``fn(*args)`` in the next loop iteration; :meth:`settle` waits for them."""
        self._deferred += 1
        asyncio.get_running_loop().call_soon(self._run_deferred, fn, args)

    def _run_deferred(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:  # bookkeeping must never kill the loop
            self.log.exception("deferred_failed", call=getattr(fn, "__qualname__", repr(fn)))
        finally:
            self._deferred -= 1

    async def settle(self) -> None:
        """Let deferred bookkeeping (run end lines, history rows) finish."""
        # The deferred calls are call_soon callbacks: each pass lets one loop iteration run
        # them, so this never waits on anything but the loop itself.
        while self._deferred:  # noqa: ASYNC110
            await asyncio.sleep(0)

    def set_host(self, host: PluginHost) -> None:
        self.host = host
        self.listeners = host.has_impls("taskd_job_event")
        self.executors.set_registry(host.executors)

    def set_executor_tables(self, tables: Mapping[str, Mapping[str, Any]]) -> None:
        """A reload's executor tables: an executor not made yet gets them; one made already
        keeps its own until the next start (logged, as daemon settings that need one)."""
        for name in self.executors.made_with_tables(self.executor_tables, tables):
            self.log.warning(
                "restart_needed",
                key=name,
                hint="this setting takes effect at the next restart",
            )
        self.executor_tables = tables

    def new_run_id(self) -> str:
        # Short, unique per daemon start and sortable within it; cheaper than uuid4 per run.
        self._seq += 1
        return f"{self._prefix}{self._seq:06x}"

    def emit(self, event: JobEvent) -> None:
        if event.kind is EventKind.SKIPPED:
            self.stats.skips[(event.job, event.reason or "")] += event.count
        if self.listeners:
            self.host.job_event(event)

    # -- pools ----------------------------------------------------------------------------

    async def procs(self) -> ProcessPool:
        """The process pool, started on first use (a config without cpu jobs never forks)."""
        return await self.process.started()

    @property
    def started_procs(self) -> ProcessPool | None:
        """The process pool if it has been started, else None (see :meth:`procs`)."""
        return self.process.pool

    @property
    def pool_degraded(self) -> str | None:
        """Why the process pool is degraded (its workers crash-loop), or None."""
        pool = self.process.pool
        return pool.degraded if pool is not None else None

    async def to_thread(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await self.threads.call(func, *args, **kwargs)

    async def to_process(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        pool = await self.procs()
        result: T = await pool.run(
            func, args, kwargs, label=getattr(func, "__qualname__", "to_process")
        )
        return result

    async def close(self, *, kill: bool, timeout: float | None = None) -> None:
        await self.settle()
        await self.resources.close_all()
        await self.executors.close(kill=kill, timeout=timeout)
        await self.settle()
