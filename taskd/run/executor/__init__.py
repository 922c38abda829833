"""Executors: where a blocking or cpu job's function runs. _base has the seam (Executor,
Call, ExecutorSettings), registry.py the names; each executor is a module of its own.

The names below are imported when first used (PEP 562): the plugin host needs only the
registry, on every command's path."""

from __future__ import annotations

from taskd._lazy import lazy

TYPE_CHECKING = False  # not typing's: see taskd/__init__.py
if TYPE_CHECKING:
    from taskd.run.executor._base import Call, Executor, ExecutorSettings, Problem
    from taskd.run.executor.registry import (
        DEFAULT_EXECUTOR,
        ExecutorRegistry,
        ExecutorType,
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

_HOME = {
    "Call": "taskd.run.executor._base",
    "Executor": "taskd.run.executor._base",
    "ExecutorSettings": "taskd.run.executor._base",
    "Problem": "taskd.run.executor._base",
    "DEFAULT_EXECUTOR": "taskd.run.executor.registry",
    "ExecutorRegistry": "taskd.run.executor.registry",
    "ExecutorType": "taskd.run.executor.registry",
    "builtin_registry": "taskd.run.executor.registry",
}

if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy(__name__, _HOME, globals())
