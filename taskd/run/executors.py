"""Where a run's function executes: on the loop (io), in the thread pool (blocking), or in the
process pool (cpu). Each raises JobTimeout when the attempt's timeout passes."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from taskd.errors import JobTimeout

log = structlog.get_logger("taskd.run")
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
    """A bounded thread pool that knows which of its runs are stuck.

    A thread cannot be killed. A blocking run past its timeout is given up on: its run fails
    with JobTimeout and it is counted as stuck until its thread returns, if ever. The daemon
    exits after the drain deadline without joining stuck threads (see Daemon)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="taskd-job")
        self._lock = threading.Lock()
        self.stuck: dict[Future[Any], tuple[str, float]] = {}
        self.stuck_total = 0

    async def run(
        self, func: Callable[..., T], kwargs: Mapping[str, Any], timeout: float | None, label: str
    ) -> T:
        cfut = self._pool.submit(functools.partial(func, **kwargs))
        try:
            return await with_timeout(asyncio.wrap_future(cfut), timeout, label)
        except BaseException:
            # Timed out or cancelled while the thread still runs: it cannot be stopped.
            if not cfut.done() and not cfut.cancel():
                self._mark_stuck(cfut, label)
            raise

    def _mark_stuck(self, cfut: Future[Any], label: str) -> None:
        with self._lock:
            self.stuck[cfut] = (label, time.time())
            self.stuck_total += 1
            count = len(self.stuck)
        log.error(
            "thread_stuck",
            run=label,
            stuck=count,
            workers=self.workers,
            hint="a thread cannot be killed; it keeps a thread_workers slot until its call returns",
        )
        cfut.add_done_callback(self._unstuck)

    def _unstuck(self, cfut: Future[Any]) -> None:
        with self._lock:
            label, since = self.stuck.pop(cfut, ("?", time.time()))
        log.warning("thread_unstuck", run=label, stuck_for=round(time.time() - since, 3))

    async def call(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """For ``ctx.to_thread``: no timeout of its own (the run's timeout applies)."""
        return await asyncio.wrap_future(
            self._pool.submit(functools.partial(func, *args, **kwargs))
        )

    @property
    def stuck_count(self) -> int:
        with self._lock:
            return len(self.stuck)

    def shutdown(self) -> None:
        # Never wait: a stuck thread would hang the daemon's exit.
        self._pool.shutdown(wait=False, cancel_futures=True)
