"""The thread pool for blocking jobs: it replaces stuck threads, up to a hard cap.

A thread cannot be killed. A blocking call whose run was given up on (timed out, or cancelled
while the call still runs) keeps its thread until the call returns, if ever. With a fixed
pool, ``thread_workers`` such hangs would leave no thread for any other blocking job, and runs
would wait behind them for ever. So:

- each stuck thread is replaced: the pool may run ``workers`` calls at once besides its stuck
  ones, as long as it has at most ``limit`` threads in all (``[daemon] thread_workers_max``);
- when every thread the cap allows is stuck, the pool is *exhausted*: a new call is refused
  at once (ThreadPoolExhausted) rather than queued for ever, and the calls already waiting
  fail the same way. Said once per episode in the log;
- when a stuck call returns, its thread is free again and the extra threads exit, so the pool
  goes back to ``workers`` threads (it does not grow for ever).

``concurrent.futures.ThreadPoolExecutor`` cannot do this: its ``max_workers`` is fixed and it
never lets a thread go. This pool is a deque of work items and threads that start on demand
and exit when they are not needed; all its counters change under one lock."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from taskd.errors import ThreadPoolExhausted

log = structlog.get_logger("taskd.run")

WorkState = Literal["queued", "running", "done"]


@dataclass(eq=False, slots=True)
class Work:
    """One call handed to the pool. ``future`` gets its result."""

    fn: Callable[[], Any]
    label: str
    future: Future[Any] = field(default_factory=Future)
    state: WorkState = "queued"
    stuck_since: float | None = None  # when its run gave up on it, while it still ran


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """The pool at one moment, for status and metrics."""

    workers: int
    max: int
    alive: int  # threads started and not exited (stuck ones included)
    busy: int  # threads in a call that is not stuck
    stuck: int
    queued: int
    exhausted: str | None  # why no call can get a thread, or None

    def as_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "max": self.max,
            "alive": self.alive,
            "busy": self.busy,
            "stuck": self.stuck,
            "queued": self.queued,
            "exhausted": self.exhausted,
        }


class ThreadPool:
    """``workers`` calls at once, plus a replacement thread per stuck call, ``limit`` threads
    at most. Thread-safe; :meth:`give_up` is how a caller says it no longer waits."""

    def __init__(self, workers: int, limit: int, *, name: str = "taskd-job") -> None:
        if not 1 <= workers <= limit:
            raise ValueError(f"need 1 <= workers <= limit, got {workers} and {limit}")
        self.workers = workers
        self.limit = limit
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Work] = deque()
        self._threads = 0  # alive
        self._idle = 0  # waiting for work
        self._stuck: dict[Work, None] = {}  # insertion-ordered: the oldest first
        self._closed = False
        self._seq = 0
        # A plain bool so the scheduler can read it on every tick without taking the lock.
        self.exhausted = False
        self._exhausted_since = 0.0
        self.stuck_total = 0  # calls given up on while running, ever
        self.exhausted_total = 0  # episodes

    # -- the caller's side ---------------------------------------------------------------

    def submit(self, fn: Callable[[], Any], label: str) -> Work:
        """Queue ``fn``; raises ThreadPoolExhausted when no thread can ever be had for it
        until a stuck call returns, and RuntimeError after :meth:`shutdown`."""
        work = Work(fn, label)
        with self._cond:
            if self._closed:
                raise RuntimeError("the thread pool is shut down (taskd is stopping)")
            if self.exhausted:
                raise ThreadPoolExhausted(self._why_exhausted())
            self._queue.append(work)
            try:
                self._spawn_if_needed()
            except BaseException:
                self._queue.pop()  # the caller gets the error; the call must not run later
                raise
            self._cond.notify()
        return work

    def give_up(self, work: Work) -> bool:
        """The caller no longer waits for ``work`` (its run timed out or was cancelled).
        Queued, it is dropped; running, its thread is stuck and replaced if the cap allows.
        True when it became stuck."""
        dropped: list[Work] = []
        why = ""
        spawn_error: BaseException | None = None
        with self._cond:
            if work.state == "queued":
                self._remove_queued(work)
                work.state = "done"
                work.future.cancel()
                return False
            if work.state == "done" or work.stuck_since is not None:
                return False
            work.stuck_since = time.time()
            self._stuck[work] = None
            self.stuck_total += 1
            stuck = len(self._stuck)
            started_exhausted = False
            if stuck >= self.limit and not self.exhausted:
                # Every thread the cap allows is stuck: nothing queued can start until one
                # returns, which may be never. Refuse rather than keep callers waiting.
                self.exhausted = started_exhausted = True
                self._exhausted_since = time.time()
                self.exhausted_total += 1
                dropped = list(self._queue)
                self._queue.clear()
                for item in dropped:
                    item.state = "done"
                why = self._why_exhausted()
            else:
                try:
                    self._spawn_if_needed()  # a replacement, if calls wait
                except Exception as exc:  # the caller's own error (a timeout) must win
                    spawn_error = exc
            free = self._free()
        log.error(
            "thread_stuck",
            run=work.label,
            stuck=stuck,
            workers=self.workers,
            max=self.limit,
            free=free,
            hint="a thread cannot be killed; it is replaced until thread_workers_max threads "
            "are stuck, and it holds its thread until its call returns",
        )
        if spawn_error is not None:
            log.error("thread_start_failed", error=repr(spawn_error), stuck=stuck)
        if started_exhausted:
            log.error("thread_pool_exhausted", reason=why, stuck=stuck, max=self.limit)
            for item in dropped:
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(ThreadPoolExhausted(why))
        return True

    def shutdown(self) -> None:
        """Refuse new calls, cancel the queued ones and let idle threads exit. Never waits:
        a stuck thread would hold the daemon's exit for ever."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            for work in queued:
                work.state = "done"
            self._cond.notify_all()
        for work in queued:
            work.future.cancel()

    # -- reading ---------------------------------------------------------------------------

    @property
    def stuck_count(self) -> int:
        return len(self._stuck)  # one read of a dict's size: atomic under the GIL

    def status(self) -> PoolStatus:
        with self._cond:
            stuck = len(self._stuck)
            return PoolStatus(
                workers=self.workers,
                max=self.limit,
                alive=self._threads,
                busy=self._threads - self._idle - stuck,
                stuck=stuck,
                queued=len(self._queue),
                exhausted=self._why_exhausted() if self.exhausted else None,
            )

    # -- inside, with the lock held ------------------------------------------------------

    def _allowed(self) -> int:
        """How many threads may run calls that are not stuck."""
        return min(self.workers, self.limit - len(self._stuck))

    def _free(self) -> int:
        return max(self._allowed() - (self._threads - len(self._stuck) - self._idle), 0)

    def _spawn_if_needed(self) -> None:
        # More queued calls than idle threads to take them, and room under the cap: start
        # one thread (each submit or replacement adds at most one call's worth of need).
        if len(self._queue) > self._idle and self._threads - len(self._stuck) < self._allowed():
            self._threads += 1
            self._seq += 1
            # A daemon thread: the interpreter's exit must not join a stuck one.
            thread = threading.Thread(
                target=self._worker, name=f"{self._name}-{self._seq}", daemon=True
            )
            try:
                thread.start()
            except BaseException:  # out of threads (RuntimeError) or memory: count it back
                self._threads -= 1
                self._seq -= 1
                raise

    def _remove_queued(self, work: Work) -> None:
        # Always there: a thread takes a call and marks it running under the same lock.
        with contextlib.suppress(ValueError):
            self._queue.remove(work)

    def _why_exhausted(self) -> str:
        stuck = len(self._stuck)
        oldest = next(iter(self._stuck), None)
        since = ""
        if oldest is not None and oldest.stuck_since is not None:
            since = (
                f"; the oldest is {oldest.label}, stuck for {time.time() - oldest.stuck_since:.0f}s"
            )
        return (
            f"{stuck} of {self.limit} threads are stuck in blocking calls that outlived "
            f"their runs{since}; blocking runs are skipped until one returns. Fix the job "
            "that hangs (see thread_stuck in the log) and restart taskd, or raise "
            "[daemon] thread_workers_max"
        )

    # -- the threads ---------------------------------------------------------------------

    def _worker(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._queue:
                    if self._closed:
                        self._threads -= 1
                        return
                    self._idle += 1
                    cond.wait()
                    self._idle -= 1
                work = self._queue.popleft()
                if not work.future.set_running_or_notify_cancel():
                    work.state = "done"  # its caller gave up while it waited
                    continue
                work.state = "running"
            result: Any = None
            error: BaseException | None = None
            try:
                result = work.fn()
            except BaseException as exc:  # SystemExit too: the run's failure, not this thread's
                error = exc
            exit_now, recovered = self._done(work)
            if error is not None:
                work.future.set_exception(error)
                error = None  # no reference cycle through the traceback
            else:
                work.future.set_result(result)
            del result
            if work.stuck_since is not None:
                log.warning(
                    "thread_unstuck",
                    run=work.label,
                    stuck_for=round(time.time() - work.stuck_since, 3),
                )
            if recovered is not None:
                log.warning(
                    "thread_pool_recovered",
                    exhausted_for=round(recovered, 3),
                    stuck=self.stuck_count,
                    max=self.limit,
                )
            if exit_now:
                return

    def _done(self, work: Work) -> tuple[bool, float | None]:
        """A call returned. Returns whether its thread should exit (the pool has more threads
        than it may use, or is shut down) and, when the pool stops being exhausted, for how
        long it was."""
        with self._cond:
            work.state = "done"
            recovered: float | None = None
            if work in self._stuck:
                del self._stuck[work]
                if self.exhausted and len(self._stuck) < self.limit:
                    self.exhausted = False
                    recovered = time.time() - self._exhausted_since
            # This thread is no longer stuck: if that makes more free threads than allowed
            # (it had been replaced), it leaves, giving the extra capacity back.
            excess = self._threads - len(self._stuck) > self._allowed()
            if excess or self._closed:
                self._threads -= 1
                return True, recovered
            return False, recovered
