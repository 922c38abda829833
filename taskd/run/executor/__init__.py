"""Executors: where a blocking or cpu job's function runs (see _base for the seam)."""

from taskd.run.executor._base import (
    DEFAULT_EXECUTOR,
    Call,
    Executor,
    ExecutorRegistry,
    ExecutorSettings,
    ExecutorType,
    Problem,
)
from taskd.run.executor.live import Executors
from taskd.run.executor.process import ProcessExecutor
from taskd.run.executor.thread import LoopExecutor, ThreadExecutor

__all__ = [
    "DEFAULT_EXECUTOR",
    "Call",
    "Executor",
    "ExecutorRegistry",
    "ExecutorSettings",
    "ExecutorType",
    "Executors",
    "LoopExecutor",
    "Problem",
    "ProcessExecutor",
    "ThreadExecutor",
    "builtin_registry",
]


def builtin_registry() -> ExecutorRegistry:
    """A registry with the built-ins: ``loop`` (io), ``thread`` (blocking), ``process`` (cpu)."""
    registry = ExecutorRegistry()
    registry.add(LoopExecutor)
    registry.add(ThreadExecutor)
    registry.add(ProcessExecutor)
    return registry
