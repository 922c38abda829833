"""The executor seam: what runs a blocking or cpu job's function, named so a job can pick one
(``executor = "…"``) and a plugin can add one (the ``taskd_executors`` hook).

io runs are no executor's: the runner awaits them inline on the loop (the fused path
depends on it). The built-ins are ``thread`` (blocking) and ``process`` (cpu); a job whose
executor is its kind's default never goes through :class:`Executor.run` at all (the
runner keeps its direct calls), so the seam costs the default runs nothing."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from taskd.config.model import JobConfig
    from taskd.plugin.jobtype import JobType, Kind
    from taskd.run.encoding import Encoded

# The executor a job of each kind gets when it names none. "loop" is a name only: io runs
# are awaited inline by the runner.
DEFAULT_EXECUTOR: Mapping[str, str] = {"io": "loop", "blocking": "thread", "cpu": "process"}

# (key, message, hint): one problem with a job's or a table's settings, its key relative to
# that job's table (``max_memory``) or to the executor's own table (``scheduler``).
Problem = tuple[str, str, str | None]


@dataclass(frozen=True, slots=True)
class Call:
    """One attempt of a run, as an executor gets it."""

    func: Callable[..., Any]
    kwargs: Mapping[str, Any]
    timeout: float | None
    max_memory: int | None
    max_result: int  # bytes of the result's stored form (taskd.run.encoding.encode)
    label: str  # "job 'j' run r": what its errors and log lines say
    key: str  # unique per attempt ("<run_id>-<attempt>")


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """What an executor is made with: its table from the config (``[executors.<name>]``, or
    the table it registered, e.g. ``[dask]``; empty when absent) and the daemon's sizes."""

    table: Mapping[str, Any] = field(default_factory=dict)
    thread_workers: int = 8
    thread_workers_max: int = 0
    process_workers: int = 1


class Executor(Protocol):
    """Runs attempts of one kind of job somewhere other than the loop.

    ``run`` raises as the local pools do: :class:`taskd.errors.JobTimeout` when
    ``call.timeout`` passes, the job's own exception (its text made where it ran) when it
    raised, a :class:`taskd.errors.JobError` subclass when the executor failed it."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[Kind]]

    def __init__(self, settings: ExecutorSettings) -> None:
        """Cheap: nothing starts until :meth:`start`."""

    @classmethod
    def check_table(cls, table: Mapping[str, Any]) -> list[Problem]:
        """Problems with the executor's config table (load time; keys relative to it)."""
        ...

    @classmethod
    def validate(cls, job: JobConfig, jobtype: JobType) -> list[Problem]:
        """Problems with a job that names this executor (load time; keys relative to the
        job's table), e.g. an option this executor cannot honour."""
        ...

    async def start(self) -> None:
        """Get ready to run; idempotent (a lazy executor starts on its first run)."""
        ...

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        """One attempt: the result and its stored form, measured where it ran."""
        ...

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        """Stop: let runs end for up to ``timeout`` seconds (``kill``: at once)."""
        ...

    def gauges(self) -> Mapping[str, float]:
        """Figures for /metrics and status (name -> value), cheap to read."""
        ...


ExecutorFactory = Callable[[ExecutorSettings], Executor]


@dataclass(frozen=True, slots=True)
class ExecutorType:
    """A registered executor: its class (imported on first use when registered lazily),
    how to make one, and the config table its settings come from."""

    name: str
    kinds: frozenset[Kind]
    table: str  # "executors.<name>" unless it registered its own (the bundled dask: "dask")
    _load: Callable[[], type[Executor]] = field(repr=False, compare=False)
    _factory: ExecutorFactory | None = field(default=None, repr=False, compare=False)

    @property
    def cls(self) -> type[Executor]:
        """The executor's class (its checks are classmethods: nothing is made to ask them)."""
        return self._load()

    def make(self, settings: ExecutorSettings) -> Executor:
        factory = self._factory if self._factory is not None else self.cls
        return factory(settings)


def _import(target: str) -> Callable[[], type[Executor]]:
    """A loader of ``"module:Class"``, imported on first call and kept."""

    @functools.cache
    def load() -> type[Executor]:
        module, _, attr = target.partition(":")
        cls: type[Executor] = getattr(importlib.import_module(module), attr)
        return cls

    return load


class ExecutorRegistry:
    """The executors a daemon knows, by name: the built-ins and what plugins add."""

    def __init__(self) -> None:
        self._types: dict[str, ExecutorType] = {}

    def add(
        self,
        cls: type[Executor],
        factory: ExecutorFactory | None = None,
        *,
        table: str | None = None,
    ) -> None:
        """Register ``cls`` under ``cls.name``; ``factory`` (default: ``cls`` itself) makes
        one from its settings, read from ``[<table>]`` (default ``[executors.<name>]``).
        A name taken already raises ValueError: two executors must not share one."""
        self._add(ExecutorType(cls.name, cls.kinds, "", lambda: cls, factory), table)

    def add_lazy(
        self, name: str, kinds: frozenset[Kind], target: str, *, table: str | None = None
    ) -> None:
        """Register ``"module:Class"`` without importing it: the import happens when a job
        names the executor (the bundled dask one: a daemon without dask jobs never imports
        its module, let alone distributed)."""
        self._add(ExecutorType(name, kinds, "", _import(target)), table)

    def _add(self, kind: ExecutorType, table: str | None) -> None:
        name = kind.name
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"executor name must be an identifier, got {name!r}")
        if name in self._types:
            raise ValueError(f"executor {name!r} is registered already")
        self._types[name] = dataclasses.replace(kind, table=table or f"executors.{name}")

    def get(self, name: str) -> ExecutorType | None:
        return self._types.get(name)

    def copy(self) -> ExecutorRegistry:
        other = ExecutorRegistry()
        other._types = dict(self._types)
        return other

    def names(self) -> list[str]:
        return sorted(self._types)

    def tables(self) -> dict[str, str]:
        """Config table -> executor name."""
        return {kind.table: name for name, kind in self._types.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[ExecutorType]:
        return iter(self._types.values())


_CPU: frozenset[Kind] = frozenset({"cpu"})


def builtin_registry() -> ExecutorRegistry:
    """A registry with the built-ins: ``loop`` (io), ``thread`` (blocking), ``process``
    (cpu), each imported when a daemon makes it."""
    registry = ExecutorRegistry()
    here = "taskd.run.executor"
    registry.add_lazy("loop", frozenset({"io"}), f"{here}.thread:LoopExecutor")
    registry.add_lazy("thread", frozenset({"blocking"}), f"{here}.thread:ThreadExecutor")
    registry.add_lazy("process", _CPU, f"{here}.process:ProcessExecutor")
    return registry
