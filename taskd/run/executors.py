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


async def with_timeout(awaitable: Awaitable[T], timeout: float | None, what: str) -> T:
    """Await with a timeout that cancels it; raises JobTimeout (never a TimeoutError the job
    raised itself, which stays the job's own failure)."""
    if timeout is None:
        return await awaitable
    cm = asyncio.timeout(timeout)
    try:
        async with cm:
            return await awaitable
    except TimeoutError:
        if cm.expired():
            raise JobTimeout(f"{what} timed out after {timeout:g}s") from None
        raise


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
