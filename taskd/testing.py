"""Testing job plugins with pytest, without a daemon.

:class:`JobRunner` runs a job the way the daemon does, through the daemon's own runner
(taskd.run.runner.execute) and services (taskd.run.runtime.Runtime):

- the plugin is loaded as the daemon loads it (a drop-in file under its synthetic module
  name, its ``taskd_job_types`` hook asked, each job type's signature checked);
- the options, given as a dict, are checked and converted as from the TOML file (unknown
  or missing options, wrong types, ``Path`` and duration conversion), and so are the job
  settings (``timeout="5s"``, ``retries``, ``retry_backoff``, ``max_memory``);
- ``io`` runs on the loop with a real :class:`~taskd.JobContext` (``ctx.resource`` works;
  resources are closed when the runner closes), ``blocking`` in the daemon's thread pool,
  ``cpu`` in a real worker process of the daemon's process pool, so what does not pickle
  fails in the test, not in production;
- timeout and retries with backoff are the runner's own;
- every run ends in a :class:`RunReport`: outcome, result, error, attempts and the events
  the ``taskd_job_event`` hook saw.

::

    from pathlib import Path
    from taskd.testing import JobRunner

    PLUGIN = Path(__file__).with_name("disk.py")

    async def test_disk_free():
        async with JobRunner(PLUGIN) as runner:
            report = await runner.run("disk_free", {"path": "/", "min_free_gib": 0.0})
        assert report.outcome == "succeeded", report.error
        assert report.result["path"] == "/"

The pytest plugin (taskd.pytest_plugin, loaded by pytest itself once taskd is installed)
offers the same as the ``taskd_run`` and ``taskd_runner`` fixtures.

:func:`make_context` gives a bare :class:`~taskd.JobContext` for calling an ``io`` job
function directly.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

import structlog

from taskd.errors import ConfigError, ConfigIssue, PluginError
from taskd.plugin.hookspecs import hookimpl
from taskd.plugin.jobtype import JobType
from taskd.run.context import JobContext, Offloader
from taskd.run.events import EventKind, JobEvent, Outcome
from taskd.state.shared import SharedState

if TYPE_CHECKING:
    from taskd.jobspec import JobSpec
    from taskd.plugin.manager import PluginHost
    from taskd.run.runtime import Runtime

__all__ = ["JobRunner", "PluginLike", "RunReport", "make_context"]

# A plugin as a test names it: its drop-in file, or a module (or any object) with hooks.
PluginLike = str | os.PathLike[str] | ModuleType | object

_FILE = "taskd.testing"  # where a ConfigError from a test's options says it comes from


def make_context(
    job: str = "test-job",
    *,
    attempt: int = 1,
    scheduled: datetime | None = None,
    state: SharedState | None = None,
    offload: Offloader | None = None,
    **log_fields: Any,
) -> JobContext:
    """A real :class:`JobContext` with a fresh shared state, for calling an ``io`` job directly.

    Must be called while an event loop runs (the state's lock belongs to it). Resources a job
    opens through it (``ctx.resource``) are not closed by anyone: use :class:`JobRunner`
    for jobs that open any."""
    run_id = uuid.uuid4().hex[:12]
    return JobContext(
        job=job,
        run_id=run_id,
        attempt=attempt,
        scheduled=scheduled or datetime.now(UTC),
        log=structlog.get_logger("taskd.job").bind(job=job, run_id=run_id, **log_fields),
        state=state if state is not None else SharedState(),
        offload=offload,
    )


@dataclass(frozen=True, slots=True)
class RunReport:
    """How one run ended, with what the daemon would have recorded and announced."""

    job: str  # the job's name (the job type's, unless ``name=`` was given)
    run_id: str
    outcome: Outcome  # a StrEnum: compare with "succeeded", "failed", "timed_out"
    result: Any  # what the job returned (None unless it succeeded)
    error: str | None  # "Type: message", as the history and the run line show it
    attempts: int
    duration: float  # seconds, retries and backoff included
    events: tuple[JobEvent, ...]  # what the taskd_job_event hook saw, in order

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCEEDED

    @property
    def kinds(self) -> list[EventKind]:
        """The events' kinds, e.g. ``["started", "retrying", "started", "succeeded"]``."""
        return [e.kind for e in self.events]


class _Recorder:
    """A plugin of the event hook that keeps every event, so a report can list its run's."""

    def __init__(self) -> None:
        self.events: list[JobEvent] = []

    @hookimpl
    def taskd_job_event(self, event: JobEvent) -> None:
        self.events.append(event)


class JobRunner:
    """Runs jobs the way the daemon does (see the module docstring). An async context
    manager; or call :meth:`close` at the end, which closes resources and stops the pools.

    ``plugins``: drop-in files (paths) and modules or objects with hook implementations.
    ``entry_points``: also load installed plugins, as the daemon does by default.
    ``executor_tables``: the executors' config tables, ``{"dask": {"scheduler": "local"}}``.
    The other arguments are the ``[daemon]`` settings of the same names."""

    def __init__(
        self,
        *plugins: PluginLike,
        entry_points: bool = False,
        process_workers: int = 1,
        thread_workers: int = 4,
        thread_workers_max: int = 0,
        max_result_size: int = 1 << 20,
        executor_tables: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._plugins = plugins
        # The config's executor tables by name: {"dask": {"scheduler": "local"}}.
        self._tables: Mapping[str, Mapping[str, Any]] = executor_tables or {}
        self._entry_points = entry_points
        self._settings = (process_workers, thread_workers, thread_workers_max, max_result_size)
        self._recorder = _Recorder()
        self._host: PluginHost | None = None
        self._rt: Runtime | None = None
        self._closed = False

    async def __aenter__(self) -> JobRunner:
        self._runtime()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what the plugins offer -----------------------------------------------------------

    @property
    def host(self) -> PluginHost:
        """The loaded plugins; raises PluginError if one of them is broken."""
        if self._host is None:
            self._host = self._load()
        return self._host

    @property
    def job_types(self) -> Mapping[str, JobType]:
        return self.host.job_types

    @property
    def state(self) -> SharedState:
        """The shared state every run of this runner sees (results land under job names)."""
        return self._runtime().shared

    def _load(self) -> PluginHost:
        from taskd.plugin import dropin
        from taskd.plugin.manager import PluginHost

        files, objects = [], []
        for plugin in self._plugins:
            if isinstance(plugin, str | os.PathLike):
                path = Path(plugin).absolute()
                try:
                    files.append(dropin.entry(path))
                except OSError as exc:
                    raise PluginError(
                        f"cannot read plugin {path}: {exc}", origin=str(path)
                    ) from exc
            else:
                objects.append(plugin)
        host = PluginHost.load(
            entry_points=self._entry_points, files=files, extra=[*objects, self._recorder]
        )
        broken = host.broken
        if broken:
            text = "\n".join(f"{r.origin}: {r.error}\n{r.traceback or ''}" for r in broken)
            raise PluginError(f"plugin failed to load:\n{text}", origin=broken[0].origin)
        return host

    def _runtime(self) -> Runtime:
        if self._closed:
            raise RuntimeError("this JobRunner is closed")
        if self._rt is None:
            from taskd.run.runtime import Runtime

            procs, threads, threads_max, max_result = self._settings
            self._rt = Runtime(
                shared=SharedState(),
                host=self.host,
                thread_workers=threads,
                process_workers=procs,
                thread_workers_max=threads_max,
                max_result_size=max_result,
                executor_tables=self._tables,
            )
        return self._rt

    # -- running --------------------------------------------------------------------------

    def spec(
        self,
        job_type: str | JobType,
        options: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        **settings: Any,
    ) -> JobSpec:
        """The job as the daemon would hold it, or a ConfigError saying what the config
        loader would say about it. ``settings`` are the ``[jobs.<name>]`` keys: ``timeout``,
        ``retries``, ``retry_backoff``, ``max_memory``, ``executor`` (TOML values:
        ``timeout="5s"``)."""
        from taskd.config.checks import suggest
        from taskd.config.load import job_from_table
        from taskd.jobspec import JobSpec
        from taskd.plugin.options import check_options, convert_options, signature_problem

        if isinstance(job_type, JobType):
            jt = job_type
            problem = signature_problem(jt)
            if problem:
                raise TypeError(f"job type {jt.name!r}: {problem}")
        else:
            found = self.job_types.get(job_type)
            if found is None:
                known = sorted(self.job_types)
                why = self.host.why_missing(job_type) or suggest(job_type, known)
                raise ConfigError(
                    [
                        ConfigIssue(
                            _FILE,
                            "type",
                            f"unknown job type {job_type!r}",
                            hint=why or f"the plugins offer: {', '.join(known) or 'none'}",
                        )
                    ]
                )
            jt = found
        name = name or jt.name
        options = dict(options or {})
        prefix = f"jobs.{name}"
        issues = [
            ConfigIssue(_FILE, f"{prefix}.options.{key}", problem)
            for key, problem in _not_toml(options)
        ]
        if not issues:
            for key, message, hint in check_options(jt, options):
                path = f"{prefix}.options.{key}" if key else f"{prefix}.options"
                issues.append(ConfigIssue(_FILE, path, message, hint=hint))
        if "max_memory" in settings and jt.kind != "cpu":
            issues.append(
                ConfigIssue(_FILE, f"{prefix}.max_memory", "max_memory applies to cpu jobs only")
            )
        if issues:
            raise ConfigError(issues)
        table = {"type": jt.name, "on": "startup", **settings, "options": options}
        config = job_from_table(name, table, file=_FILE)
        executor = None
        if config.executor is not None:  # checked as the daemon does
            from taskd.plugin.executors import ExecutorCheck

            def issue(path: str, message: str, hint: str | None) -> None:
                issues.append(ConfigIssue(_FILE, path, message, hint=hint))

            check = ExecutorCheck(self._tables, self.host.executors, issue)
            executor = check.job(prefix, config, jt)[1]
            if issues:
                raise ConfigError(issues)
        return JobSpec(config, jt, None, kwargs=convert_options(jt, options), executor=executor)

    async def run(
        self,
        job_type: str | JobType,
        options: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        **settings: Any,
    ) -> RunReport:
        """Run the job once, with its retries, and report how it ended. A job's failure is
        the report's outcome; bad options or settings raise ConfigError before it runs."""
        from taskd.ledger import NULL_LEDGER
        from taskd.run.events import Cause
        from taskd.run.runner import RunInfo, execute

        spec = self.spec(job_type, options, name=name, **settings)
        rt = self._runtime()
        now = time.time()
        info = RunInfo(rt.new_run_id(), spec.name, now, now, Cause.EXEC)
        # NULL_LEDGER: no history or schedule, a test leaves no state behind.
        await execute(rt, spec, info, NULL_LEDGER)
        await rt.settle()  # the end's bookkeeping: shared state, the end event
        return RunReport(
            job=spec.name,
            run_id=info.run_id,
            outcome=info.outcome or Outcome.CANCELLED,
            result=info.result if info.outcome is Outcome.SUCCEEDED else None,
            error=info.error,
            attempts=info.attempt,
            duration=info.ended - info.started,
            events=tuple(e for e in self._recorder.events if e.run_id == info.run_id),
        )

    async def close(self) -> None:
        """Let async event hooks finish, close every resource the jobs opened, stop the
        thread and process pools. Idempotent."""
        if self._closed:
            return
        self._closed = True
        rt, self._rt = self._rt, None
        if rt is not None:
            await rt.settle()
            await rt.host.drain_hooks()
            await rt.close(kill=True)


_TOML_SCALARS = (str, bool, int, float, dt.datetime, dt.date, dt.time)


def _not_toml(options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Options a TOML file could not hold (None, a tuple, a Path, bytes), as (key, problem):
    a test must not pass what the config never can."""
    problems = []
    for key, value in options.items():
        where = _toml_problem(value)
        if where is not None:
            problems.append((key, where))
    return problems


def _toml_problem(value: Any, at: str = "") -> str | None:
    if isinstance(value, _TOML_SCALARS):
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            problem = _toml_problem(item, f"{at}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{at or 'the value'}: table key {k!r} is not a string, as TOML keys are"
            problem = _toml_problem(v, f"{at}.{k}")
            if problem:
                return problem
        return None
    what = (
        "None (TOML has no null: leave the option out for its default)"
        if value is None
        else (f"a {type(value).__qualname__}")
    )
    hint = {
        "PosixPath": "; write the path as a string, as the config would",
        "tuple": "; write a list, as the config would",
    }.get(type(value).__name__, "")
    return f"{at[1:] + ': ' if at else ''}{what} is not a TOML value{hint}"
