"""taskd: a pluggable async task-runner daemon.

The public API for plugin authors: :data:`hookimpl`, :class:`JobType`, :class:`JobContext`,
:class:`JobEvent` and the error classes.
"""

from taskd._version import __version__
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
