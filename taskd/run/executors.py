"""Where a run's function executes: on the loop (io), in the thread pool (blocking), or in the
process pool (cpu). Each raises JobTimeout when the attempt's timeout passes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from taskd.errors import JobTimeout
from taskd.run.threadpool import PoolStatus, ThreadPool, Work

T = TypeVar("T")


class _Deadline:
    """The timer of one :func:`with_timeout`: cancels the task when it fires, and remembers
    that it did. One object and one timer handle per timed attempt: ``asyncio.timeout``
    costs about twice as much (its own object, state machine and two coroutine steps for
    ``async with``), on every run of a job that has a timeout."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


async def with_timeout(awaitable: Awaitable[T], timeout: float | None, what: str) -> T:
    """Await with a timeout that cancels it; raises JobTimeout (never a TimeoutError the job
    raised itself, which stays the job's own failure).

    The same rules as ``asyncio.timeout``: the cancel the timer sent is taken back
    (``uncancel``) once the awaitable has ended, however it ended, and only a
    CancelledError that no one else asked for (the task's cancel count is back where it
    was) becomes JobTimeout; a cancel from elsewhere stays a cancel."""
    if timeout is None:
        return await awaitable
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("with_timeout must be awaited inside a task")
    cancelling = task.cancelling()
    deadline = _Deadline(task)
    handle = asyncio.get_running_loop().call_later(timeout, deadline)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if deadline.fired:
            deadline.fired = False  # its cancel is taken back here, not again below
            if task.uncancel() <= cancelling:
                raise JobTimeout(f"{what} timed out after {timeout:g}s") from None
        raise
    except TimeoutError:
        # The job turned the timer's cancel into a TimeoutError of its own (or raised one
        # just after it fired): the run still timed out. A TimeoutError before the timer
        # fired is the job's own failure.
        if deadline.fired:
            deadline.fired = False
            task.uncancel()
            raise JobTimeout(f"{what} timed out after {timeout:g}s") from None
        raise
    finally:
        handle.cancel()
        if deadline.fired:
            task.uncancel()  # it fired, and the job swallowed the cancel or failed otherwise


class ThreadRunner:
    """The asyncio side of the thread pool (taskd.run.threadpool) for blocking runs and
    ``ctx.to_thread``.

    A thread cannot be killed. A call whose run is given up on (timed out, or cancelled while
    the call still runs) is stuck until it returns, if ever: the pool replaces its thread, up
    to ``limit`` threads, and past that it is exhausted and refuses calls (the scheduler skips
    blocking runs as ``exhausted`` meanwhile). The daemon exits after the drain deadline
    without joining stuck threads (see Daemon)."""

    def __init__(self, workers: int, limit: int = 0) -> None:
        self.workers = workers
        # 0: twice thread_workers (see DaemonConfig.thread_workers_max for why).
        self.limit = limit or 2 * workers
        self.pool = ThreadPool(workers, self.limit)

    async def run(
        self, func: Callable[..., T], kwargs: Mapping[str, Any], timeout: float | None, label: str
    ) -> T:
        work = self.pool.submit(functools.partial(func, **kwargs), label)
        result: T = await self._wait(work, timeout, label)
        return result

    async def call(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """For ``ctx.to_thread``: no timeout of its own (the run's timeout applies, by
        cancelling this; the call is then stuck like a blocking run's)."""
        label = f"to_thread {getattr(func, '__qualname__', type(func).__name__)}"
        work = self.pool.submit(functools.partial(func, *args, **kwargs), label)
        result: T = await self._wait(work, None, label)
        return result

    async def _wait(self, work: Work, timeout: float | None, label: str) -> Any:
        try:
            return await with_timeout(asyncio.wrap_future(work.future), timeout, label)
        except BaseException:
            # Timed out or cancelled: a queued call is dropped, a running one is stuck (a
            # no-op when the call itself raised).
            self.pool.give_up(work)
            raise

    @property
    def stuck_count(self) -> int:
        return self.pool.stuck_count

    @property
    def exhausted(self) -> bool:
        """No blocking call can get a thread until a stuck one returns."""
        return self.pool.exhausted

    def status(self) -> PoolStatus:
        return self.pool.status()

    def shutdown(self) -> None:
        # Never waits: a stuck thread would hang the daemon's exit.
        self.pool.shutdown()
