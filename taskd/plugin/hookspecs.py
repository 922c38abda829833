"""The hooks a taskd plugin may implement. The host calls each implementation on its own, so
one that raises is logged (with its plugin) and the others still run. Any hook except
``taskd_job_types`` may be an ``async def``: the host awaits what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from taskd.plugin.jobtype import JobType
    from taskd.run.events import JobEvent
    from taskd.run.executor import ExecutorRegistry

PROJECT = "taskd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def taskd_job_types() -> Sequence[JobType]:
    """Return the job types this plugin offers.

    Called once when plugins load and again on every reload. Names must be unique across
    plugins; a clash makes both job types broken, so neither silently wins.
    """
    raise NotImplementedError


@hookspec
def taskd_executors(register: ExecutorRegistry) -> None:
    """Add executors: ``register.add(MyExecutor)``, a class with ``name``, ``kinds`` and the
    methods of :class:`taskd.run.executor.Executor`. A job picks one with ``executor =
    "<name>"``; its settings come from ``[executors.<name>]`` (``ExecutorSettings.table``).

    Called once when plugins load and again on every reload, like ``taskd_job_types``, and
    like it a plain ``def``. A name taken already (a built-in's, another plugin's) makes this
    plugin broken. The executor is made and started on the first run that needs it, and
    closed when the daemon stops.
    """


@hookspec
def taskd_daemon_started(info: dict[str, Any]) -> Any:
    """Called once jobs are scheduled. ``info``: pid, config path, state_dir, job names."""


@hookspec
def taskd_daemon_stopping(info: dict[str, Any]) -> Any:
    """Called when a stop begins, before the drain; runs may still be going."""


@hookspec
def taskd_job_event(event: JobEvent) -> Any:
    """Called for every job event: started, succeeded, failed, retrying, timed_out, skipped
    (with ``event.reason``), cancelled. Called on the event loop: keep it quick, or make it
    ``async`` (awaited in a task of its own, so a slow notifier never delays a run)."""


@hookspec
def taskd_config_reloaded(
    added: Sequence[str], changed: Sequence[str], removed: Sequence[str]
) -> Any:
    """Called after a reload was applied, with the job names it added, changed and removed."""
