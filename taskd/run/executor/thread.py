"""The ``thread`` executor (blocking jobs): the daemon's thread pool (taskd.run.executors
ThreadRunner), and ``loop``, the name io jobs' inline runs go by."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from taskd.errors import ResultTooLarge
from taskd.run.encoding import Encoded, TooLarge, encode, too_large
from taskd.run.executor._base import Call, ExecutorSettings, Problem
from taskd.run.executors import ThreadRunner
from taskd.run.limits import describe, remember

if TYPE_CHECKING:
    from taskd.config.model import JobConfig
    from taskd.plugin.jobtype import JobType, Kind


def too_large_error(result: Any, over: TooLarge, limit: int) -> ResultTooLarge:
    return ResultTooLarge(too_large(type(result).__qualname__, over.size, over.exact, limit))


def blocking(
    func: Callable[..., Any], kwargs: Mapping[str, Any], limit: int
) -> tuple[Any, Encoded]:
    """A blocking run in its thread: the job, then its result's stored form, measured there
    (not on the loop); an exception's text is made there too."""
    try:
        result = func(**kwargs)
    except BaseException as exc:
        remember(exc, describe(exc))
        raise
    try:
        return result, encode(result, limit)
    except TooLarge as over:
        raise too_large_error(result, over, limit) from None
    except BaseException as exc:  # a repr() that raised, say: still this thread's to describe
        remember(exc, describe(exc))
        raise


class _NoChecks:
    """The built-ins' checks: nothing to check in a job, and no settings of their own (their
    sizes are [daemon]'s), so any key in ``[executors.<name>]`` is a mistake."""

    name: ClassVar[str]
    _settings: ClassVar[str | None] = None  # where their settings are, for the hint

    @classmethod
    def check_table(cls, table: Mapping[str, Any]) -> list[Problem]:
        return [
            (
                key,
                f"unknown key {key!r}: the {cls.name!r} executor takes no settings",
                cls._settings,
            )
            for key in table
        ]

    @classmethod
    def validate(cls, job: JobConfig, jobtype: JobType) -> list[Problem]:
        return []


class ThreadExecutor(_NoChecks):
    """Blocking runs in the thread pool. A thread cannot be killed: a timed-out call is
    stuck until it returns (ThreadRunner says what that costs)."""

    name: ClassVar[str] = "thread"
    kinds: ClassVar[frozenset[Kind]] = frozenset({"blocking"})
    _settings = "its threads are [daemon] thread_workers and thread_workers_max"

    def __init__(self, settings: ExecutorSettings) -> None:
        self.runner = ThreadRunner(settings.thread_workers, settings.thread_workers_max)

    async def start(self) -> None:
        return None

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        work = functools.partial(blocking, call.func, call.kwargs, call.max_result)
        value: tuple[Any, Encoded] = await self.runner.run(work, {}, call.timeout, call.label)
        return value

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        self.runner.shutdown()  # never waits: a stuck thread would hang the daemon's exit

    def gauges(self) -> Mapping[str, float]:
        status = self.runner.status()
        return {"threads": status.alive, "stuck": self.runner.stuck_count}


class LoopExecutor(_NoChecks):
    """io runs: awaited inline by the runner (taskd.run.runner), never through here. It is
    registered so ``executor = "loop"`` names the default of an io job."""

    name: ClassVar[str] = "loop"
    kinds: ClassVar[frozenset[Kind]] = frozenset({"io"})
    _settings = "io runs on the event loop: there is nothing to set"

    def __init__(self, settings: ExecutorSettings) -> None:
        pass

    async def start(self) -> None:
        return None

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        raise RuntimeError("io runs are awaited on the loop by the runner, not by an executor")

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        return None

    def gauges(self) -> Mapping[str, float]:
        return {}
