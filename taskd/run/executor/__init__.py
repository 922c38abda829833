"""Executors: where a blocking or cpu job's function runs (see _base for the seam).

Only the seam is imported here (the plugin host needs it to load plugins): the executors
themselves are in their modules, imported when a daemon makes them (live.Executors)."""

from taskd.run.executor._base import (
    DEFAULT_EXECUTOR,
    Call,
    Executor,
    ExecutorRegistry,
    ExecutorSettings,
    ExecutorType,
    Problem,
    builtin_registry,
)

__all__ = [
    "DEFAULT_EXECUTOR",
    "Call",
    "Executor",
    "ExecutorRegistry",
    "ExecutorSettings",
    "ExecutorType",
    "Problem",
    "builtin_registry",
]
