"""taskd: a pluggable async task-runner daemon.

The public API for plugin authors: :data:`hookimpl`, :class:`JobType`, :class:`JobContext`,
:class:`JobEvent` and the error classes.
"""

from __future__ import annotations

from taskd._lazy import lazy
from taskd._version import __version__

# Not typing.TYPE_CHECKING: importing typing costs 2 ms before `taskd run` can install its
# signal handlers. Type checkers treat any constant of this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from taskd.errors import (
        AlreadyRunningError,
        ConfigError,
        ConfigIssue,
        JobError,
        JobTimeout,
        MemoryLimitExceeded,
        PluginError,
        StateError,
        TaskdError,
        WorkerDied,
    )
    from taskd.plugin.hookspecs import hookimpl
    from taskd.plugin.jobtype import JobType
    from taskd.run.context import JobContext
    from taskd.run.events import EventKind, JobEvent, SkipReason

__all__ = [
    "AlreadyRunningError",
    "ConfigError",
    "ConfigIssue",
    "EventKind",
    "JobContext",
    "JobError",
    "JobEvent",
    "JobTimeout",
    "JobType",
    "MemoryLimitExceeded",
    "PluginError",
    "SkipReason",
    "StateError",
    "TaskdError",
    "WorkerDied",
    "__version__",
    "hookimpl",
]

# Where each public name lives. Imported on first use (PEP 562), not here: every `taskd`
# command imports this package first, and `taskd run` must install its signal handlers before
# pluggy, structlog and asyncio load (about 60 ms), or a SIGTERM in that time kills it.
_LAZY: dict[str, str] = {
    "AlreadyRunningError": "taskd.errors",
    "ConfigError": "taskd.errors",
    "ConfigIssue": "taskd.errors",
    "JobError": "taskd.errors",
    "JobTimeout": "taskd.errors",
    "MemoryLimitExceeded": "taskd.errors",
    "PluginError": "taskd.errors",
    "StateError": "taskd.errors",
    "TaskdError": "taskd.errors",
    "WorkerDied": "taskd.errors",
    "hookimpl": "taskd.plugin.hookspecs",
    "JobType": "taskd.plugin.jobtype",
    "JobContext": "taskd.run.context",
    "EventKind": "taskd.run.events",
    "JobEvent": "taskd.run.events",
    "SkipReason": "taskd.run.events",
}


# Hidden from type checkers, which see the names through the imports above: a module
# __getattr__ would make them accept any attribute of `taskd`, typos included.
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy(__name__, _LAZY, globals())
