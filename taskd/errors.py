"""The few error classes taskd raises; each subclasses the builtin it refines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class TaskdError(Exception):
    """Base of every error taskd raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a config file: where it is, what is wrong, what to do."""

    file: str
    path: str
    message: str
    line: int | None = None
    hint: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        key = f" {self.path}:" if self.path else ""
        text = f"{where}:{key} {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class ConfigError(TaskdError, ValueError):
    """The config (or a plugin it needs) is invalid; carries every issue found, not just the first."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid config")


class PluginError(TaskdError, ImportError):
    """A plugin could not be loaded or registered; ``origin`` is its file path or entry point."""

    def __init__(self, message: str, *, origin: str) -> None:
        super().__init__(message)
        self.origin = origin


class StateError(TaskdError, OSError):
    """The state directory cannot be used: locked by another daemon, unwritable, or corrupt."""


class StateNotSaved(StateError):
    """The stop's last commit failed (a full or failing disk) after waiting for it: what
    was only in memory is lost. ``error`` says why, in an operator's words."""

    def __init__(self, error: str, *, runs: int, ticks: int, other: int) -> None:
        super().__init__(error)
        self.error, self.runs, self.ticks, self.other = error, runs, ticks, other


class AlreadyRunningError(StateError):
    """Another daemon holds the single-instance lock on the same state_dir."""


class JobError(TaskdError, RuntimeError):
    """A run failed for a reason outside the job's own code (timeout, dead worker, bad result)."""


class JobTimeout(JobError, TimeoutError):
    """A run (one attempt) exceeded its job's ``timeout``."""


class ThreadPoolExhausted(JobError):
    """No thread can be had for a blocking call: every one ``thread_workers_max`` allows is
    stuck in a call that outlived its run."""


class WorkerDied(JobError):
    """The worker process executing a run died (killed, out of memory, segfault, os._exit)."""


class MemoryLimitExceeded(JobError, MemoryError):
    """A cpu run's worker process grew past the job's ``max_memory`` and was killed."""


class ResultTooLarge(JobError):
    """A run's result was bigger than ``[daemon] max_result_size``: the run failed."""
