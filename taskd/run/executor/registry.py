"""The executor registry: names -> executor types, the built-ins and what plugins add.

Cheap to import on purpose (no dataclass, no executor): the plugin host makes one each
time plugins load, on every command's path; an executor's own module is imported only
when a job names it or a daemon makes it."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskd.plugin.jobtype import Kind
    from taskd.run.executor._base import Executor, ExecutorSettings

    ExecutorFactory = Callable[[ExecutorSettings], Executor]

# The executor a job of each kind gets when it names none. "loop" is a name only: io runs
# are awaited inline by the runner.
DEFAULT_EXECUTOR: Mapping[str, str] = {"io": "loop", "blocking": "thread", "cpu": "process"}


class ExecutorType:
    """A registered executor: its class (imported on first use when registered lazily),
    how to make one, and the config table its settings come from."""

    __slots__ = ("_cls", "_factory", "_target", "kinds", "name", "table")

    def __init__(
        self,
        name: str,
        kinds: frozenset[Kind],
        table: str,
        cls: type[Executor] | None = None,
        target: str = "",
        factory: ExecutorFactory | None = None,
    ) -> None:
        self.name = name
        self.kinds = kinds
        self.table = table  # "executors.<name>" unless it registered its own ("dask")
        self._cls = cls
        self._target = target  # "module:Class" when registered lazily
        self._factory = factory

    @property
    def cls(self) -> type[Executor]:
        """The executor's class (its checks are classmethods: nothing is made to ask them).
        Imports its module the first time, for one registered lazily."""
        if self._cls is None:
            module, _, attr = self._target.partition(":")
            self._cls = getattr(importlib.import_module(module), attr)
        assert self._cls is not None
        return self._cls

    def make(self, settings: ExecutorSettings) -> Executor:
        factory = self._factory if self._factory is not None else self.cls
        return factory(settings)

    def __repr__(self) -> str:
        return f"ExecutorType({self.name!r}, table={self.table!r})"


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
        self._add(cls.name, cls.kinds, table, cls=cls, factory=factory)

    def add_lazy(
        self, name: str, kinds: frozenset[Kind], target: str, *, table: str | None = None
    ) -> None:
        """Register ``"module:Class"`` without importing it: the import happens when a job
        names the executor (the bundled dask one: a daemon without dask jobs never imports
        its module, let alone distributed)."""
        self._add(name, kinds, table, target=target)

    def _add(
        self,
        name: str,
        kinds: frozenset[Kind],
        table: str | None,
        *,
        cls: type[Executor] | None = None,
        target: str = "",
        factory: ExecutorFactory | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"executor name must be an identifier, got {name!r}")
        if name in self._types:
            raise ValueError(f"executor {name!r} is registered already")
        table = table or f"executors.{name}"
        self._types[name] = ExecutorType(name, kinds, table, cls, target, factory)

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
    (cpu) and ``dask`` (cpu), each imported when a daemon makes it."""
    registry = ExecutorRegistry()
    here = "taskd.run.executor"
    registry.add_lazy("loop", frozenset({"io"}), f"{here}.thread:LoopExecutor")
    registry.add_lazy("thread", frozenset({"blocking"}), f"{here}.thread:ThreadExecutor")
    registry.add_lazy("process", _CPU, f"{here}.process:ProcessExecutor")
    # Bundled, as a plugin's would be, with the table SPEC §2 gives it: [dask].
    registry.add_lazy("dask", _CPU, f"{here}.dask:DaskExecutor", table="dask")
    return registry
