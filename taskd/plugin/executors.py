"""A job's ``executor`` key against the registered executors (built-ins and plugins'), and
each used executor's config table against its own checks. Part of resolving job types."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from taskd.config.checks import suggest
from taskd.config.model import JobConfig
from taskd.plugin.jobtype import JobType
from taskd.run.executor.registry import DEFAULT_EXECUTOR, ExecutorRegistry

Issue = Callable[[str, str, "str | None"], None]
_BUG = "a bug in the plugin that registered the executor: report it there, or use another executor"


def _failed(name: str, what: str, exc: Exception) -> str:
    from taskd.run.limits import describe  # only when a plugin's check raised

    return f"executor {name!r} failed to check {what}: {describe(exc, 500)}"


class ExecutorCheck:
    """Checks the jobs of one resolve; each table at most once, however many jobs use it."""

    def __init__(
        self, tables: Mapping[str, Mapping[str, Any]], registry: ExecutorRegistry, issue: Issue
    ) -> None:
        self.tables = tables  # Config.executor_tables
        self.registry = registry
        self.issue = issue
        self._tables: dict[str, bool] = {}  # table -> it passed its executor's checks

    def job(self, path: str, job: JobConfig, jt: JobType) -> tuple[bool, str | None]:
        """(fine, the executor the job's runs go to: None for its kind's default)."""
        name = job.executor
        default = DEFAULT_EXECUTOR[jt.kind]
        if name is None or name == default:
            return True, None
        found = self.registry.get(name)
        if found is None:
            known = self.registry.names()
            self.issue(
                f"{path}.executor",
                f"unknown executor {name!r}",
                suggest(name, known) or f"known executors: {', '.join(known)}",
            )
            return False, None
        if jt.kind not in found.kinds:
            kinds = " and ".join(sorted(found.kinds))
            self.issue(
                f"{path}.executor",
                f"the {name!r} executor runs {kinds} jobs; {job.type!r} is a {jt.kind} job",
                f"remove executor: {jt.kind} jobs run on {default!r}",
            )
            return False, None
        try:
            cls = found.cls
        except Exception as exc:  # a lazily registered executor whose module fails to import
            self.issue(f"{path}.executor", f"executor {name!r} cannot be loaded: {exc!r}", None)
            return False, None
        fine = True
        try:
            job_problems = cls.validate(job, jt)
        except Exception as exc:  # the plugin's bug: this job's issue, not a crash of the load
            job_problems = [("executor", _failed(name, "the job", exc), _BUG)]
        for key, message, hint in job_problems:
            self.issue(f"{path}.{key}" if key else path, message, hint)
            fine = False
        table = found.table
        if table not in self._tables:
            self._check_table(name, cls, table)
        return fine and self._tables[table], name

    def _check_table(self, name: str, cls: Any, table: str) -> None:
        try:
            problems = cls.check_table(self.tables.get(table, {}))
        except Exception as exc:
            problems = [("", _failed(name, "its table", exc), _BUG)]
        for key, message, hint in problems:
            self.issue(f"{table}.{key}" if key else table, message, hint)
        self._tables[table] = not problems

    def other_tables(self) -> None:
        """The tables no job's check has read: a mistake in one is an error whether or not
        a job names its executor yet. One no registered executor reads (a typo, a missing
        plugin), or one in the place of another's (``[executors.dask]``: dask's is
        ``[dask]``), says so."""
        known = self.registry.tables()
        for table in self.tables:
            if table in self._tables:
                continue
            name = known.get(table)
            if name is None:
                self._unknown(table)
                continue
            found = self.registry.get(name)
            assert found is not None
            try:
                cls = found.cls
            except Exception as exc:  # a lazily registered executor that fails to import
                self.issue(table, f"executor {name!r} cannot be loaded: {exc!r}", None)
                continue
            self._check_table(name, cls, table)

    def _unknown(self, table: str) -> None:
        name = table.partition(".")[2]
        other = self.registry.get(name)
        if other is not None:
            self.issue(
                table,
                f"the {name!r} executor's table is [{other.table}], not [{table}]",
                f"move these keys to [{other.table}]",
            )
            return
        self.issue(
            table,
            f"no executor named {name!r} is registered",
            suggest(name, self.registry.names())
            or "a plugin adds executors through the taskd_executors hook; check plugin_dirs",
        )
