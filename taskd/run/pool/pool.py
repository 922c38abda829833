"""The :class:`ProcessPool`: the runs side (queue, dispatch, replies, timeouts, memory
limits) over the worker processes a :class:`~taskd.run.pool.supervisor.Supervisor` keeps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar, cast

import psutil

from taskd.errors import JobError, JobTimeout, MemoryLimitExceeded, WorkerDied
from taskd.run import worker as _wire
from taskd.run.encoding import Encoded, transport_bound
from taskd.run.pool.channel import Encoder, decode_memory, decode_reply, label_of
from taskd.run.pool.records import Run, RunState, Worker, check_limits, mib
from taskd.run.pool.supervisor import Supervisor

__all__ = ["ProcessPool"]

T = TypeVar("T")

# A reply bigger than this is unpickled in a thread: building a big object graph takes the
# loop long enough to delay every other job's timers (about 10 ms a MiB).
_LOOP_UNPICKLE_MAX = 64 * 1024


class ProcessPool:
    """Worker processes for CPU-bound runs; one run per worker at a time, FIFO when all busy.

    A run that times out, exceeds its memory limit, is cancelled, or whose worker dies costs
    only that worker, which is replaced; other runs, running or queued, are unaffected.

    ``workers`` defaults to the number of CPUs. ``mp_context`` is a ``multiprocessing`` start
    method: "forkserver" (the default) or "spawn"; "fork" works but copies every descriptor
    the daemon holds into each worker. ``memory_check_interval`` is how often (seconds) the
    RSS of a worker running a run with ``max_memory`` is checked.
    """

    # The worker entry point: a module-level function, so the worker can import it. A
    # subclass may wrap it (the tests use one that fails at start-up on demand).
    worker_main: ClassVar[staticmethod[[socket.socket], None]] = staticmethod(_wire.main)

    def __init__(
        self,
        workers: int | None = None,
        *,
        mp_context: str = "forkserver",
        memory_check_interval: float = 0.5,
    ) -> None:
        n = workers if workers is not None else (os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"ProcessPool needs at least one worker, got workers={n}")
        if memory_check_interval <= 0:
            raise ValueError(f"memory_check_interval must be > 0, got {memory_check_interval}")
        self._mem_interval = memory_check_interval
        self._started = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[Run] = deque()
        self._busy = 0
        self._drained: asyncio.Future[None] | None = None
        self._encoder = Encoder()
        self._unpickler: ThreadPoolExecutor | None = None
        self._sup = Supervisor(
            n,
            mp_context,
            type(self).worker_main,
            on_idle=self._release,
            on_reply=self._on_reply,
            on_run_lost=self._on_run_lost,
            on_broken=lambda why: self._fail_queued(JobError, why),
        )

    # -- public API ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Workers that are up and accept runs (busy or idle)."""
        return sum(1 for w in self._sup.live if not w.doomed)

    @property
    def busy(self) -> int:
        """Runs executing in a worker right now."""
        return self._busy

    @property
    def queued(self) -> int:
        """Runs waiting for a free worker."""
        return len(self._queue)

    def pids(self) -> list[int]:
        """Process ids of the workers counted by :attr:`size`."""
        return sorted(w.pid for w in self._sup.live if not w.doomed)

    @property
    def restarts(self) -> Counter[str]:
        """Workers replaced, by cause (timeout, memory, killed, died, start_failed)."""
        return self._sup.restarts

    @property
    def degraded(self) -> str | None:
        """Why the pool is short of workers, or None when it is healthy.

        Set once some slot's workers have failed to start or died unexpectedly
        ``records.DEGRADED_AFTER`` times in a row (a job that crashes on every run, something
        that kills each new worker); each replacement then waits longer, up to
        ``records.BACKOFF_MAX`` seconds. Cleared by itself once a worker of that slot
        completes a run or stays up ``records.STABLE_AFTER`` seconds. Logged as ``procpool.degraded`` and ``procpool.recovered``.
        """
        return self._sup.slots.degraded

    async def start(self) -> None:
        """Start the workers; return once each is ready (or cannot be started).

        Raises :class:`~taskd.errors.JobError` if no worker could be started at all.
        """
        if self._started:
            raise RuntimeError("ProcessPool.start() was already called")
        self._started = True
        self._loop = loop = asyncio.get_running_loop()
        try:
            await self._sup.start(loop)
        except BaseException:
            self.kill()
            await self.close()
            raise
        if not self._sup.live:
            reason = self._sup.broken or "no worker process could be started"
            await self.close()
            raise JobError(reason)

    async def run(
        self,
        func: Callable[..., T],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        max_memory: int | None = None,
        max_result: int | None = None,
        label: str = "",
    ) -> T:
        """Run ``func(*args, **kwargs)`` in a worker process and return its result.

        ``func`` must be importable in the worker: a module-level function (modules loaded by
        path work too) or any picklable callable. ``timeout`` (seconds) counts execution
        only, not time queued; past it the worker is killed and :class:`JobTimeout` raised.
        ``max_memory`` (bytes of RSS) is checked every ``memory_check_interval``; past it
        the worker is killed and :class:`MemoryLimitExceeded` raised. A worker that dies
        raises :class:`WorkerDied`. The job's own exception is re-raised as is (with the
        remote traceback as a note) when it survives pickling, else as :class:`JobError`;
        ``SystemExit`` and ``KeyboardInterrupt`` from the job also become :class:`JobError`,
        so they cannot stop the daemon. If the caller is cancelled, a queued run is dropped
        and an executing one has its worker killed.

        ``max_result`` (bytes): a result whose pickle is bigger fails the run with
        :class:`ResultTooLarge`, measured in the worker, so it never crosses the pipe. A reply
        of more than ``_LOOP_UNPICKLE_MAX`` bytes is unpickled in a thread, off the loop.
        """
        run = self._submit(func, args, kwargs, timeout, max_memory, max_result, None, label)
        try:
            result: T = await run.fut
        except asyncio.CancelledError:
            self._abandon(run)
            raise
        return result

    async def run_measured(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        max_result: int,
        timeout: float | None = None,
        max_memory: int | None = None,
        label: str = "",
    ) -> tuple[Any, Encoded]:
        """Like :meth:`run`, for a result the daemon keeps: the worker also makes its stored
        form (:func:`taskd.run.encoding.encode`) and fails the run with ResultTooLarge if its
        JSON text is over ``max_result`` bytes, so the daemon never builds that text. Its
        pickle may take ``encoding.transport_bound(max_result)`` bytes on the pipe. Returns the
        result and its stored form."""
        if max_result <= 0:
            raise ValueError(f"max_result must be > 0 bytes, got {max_result}")
        bound = transport_bound(max_result)
        # Submitted here and awaited here: the cpu run path is one coroutine, not two.
        run = self._submit(func, args, kwargs, timeout, max_memory, bound, max_result, label)
        try:
            value: tuple[Any, Encoded] = await run.fut
        except asyncio.CancelledError:
            self._abandon(run)
            raise
        return value

    def _submit(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        timeout: float | None,
        max_memory: int | None,
        max_pickle: int | None,
        max_json: int | None,
        label: str,
    ) -> Run:
        """Check and encode one run, then hand it to an idle worker or queue it."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("call ProcessPool.start() before run()")
        sup = self._sup
        if sup.closing:
            raise JobError(
                f"{label or label_of(func)}: the process pool is closed; the run was not started"
            )
        if sup.broken is not None:
            raise JobError(f"{label or label_of(func)}: {sup.broken}")
        check_limits(timeout, max_memory, max_pickle)
        # Pickling happens here, so arguments that cannot be sent fail in the caller.
        frame, default_label = self._encoder.encode(
            func, args, kwargs, max_memory, max_pickle, max_json
        )
        run = Run(frame, loop.create_future(), label or default_label, timeout, max_memory)
        if sup.idle:
            self._dispatch(sup.idle.pop(), run)
        else:
            self._queue.append(run)
        return run

    async def close(self, *, timeout: float | None = None) -> None:
        """Stop taking runs, let running and queued ones finish for up to ``timeout`` seconds
        (None: no limit), then kill what is left (those runs raise :class:`WorkerDied`);
        return once every worker process is gone. Cancelling it kills the workers at once."""
        if not self._started or self._closed:
            self._closed = True
            return
        self._sup.begin_closing()
        try:
            if self._busy or self._queue:
                loop = cast(asyncio.AbstractEventLoop, self._loop)
                self._drained = drained = loop.create_future()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(drained), timeout)
            self._fail_queued(WorkerDied, "the process pool closed before the run started")
            self._sup.end_all(
                f"killed by ProcessPool.close() after its timeout of {timeout}s", gently=True
            )
            await asyncio.gather(*self._sup.tasks)
        except BaseException:
            self.kill()
            raise
        finally:
            self._sup.shutdown_spawner()
            if self._unpickler is not None:
                self._unpickler.shutdown(wait=False)
        self._closed = True

    def kill(self) -> None:
        """SIGKILL every worker now: executing and queued runs fail with :class:`WorkerDied`.

        Await :meth:`close` afterwards to reap the processes.
        """
        if not self._started:
            return
        self._sup.begin_closing()
        self._fail_queued(WorkerDied, "the process pool was killed before the run started")
        self._sup.end_all("was killed by ProcessPool.kill()", gently=False)

    async def __aenter__(self) -> ProcessPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- submission ------------------------------------------------------------------------

    def _dispatch(self, worker: Worker, run: Run) -> None:
        loop, transport = self._loop, worker.transport
        assert loop is not None and transport is not None  # started; its channel is made
        worker.run = run
        worker.ran = True
        run.state = RunState.RUNNING
        self._busy += 1
        transport.write(run.frame)
        run.frame = b""  # the transport has it now; do not hold big arguments twice
        if run.timeout is not None:
            run.timer = loop.call_later(run.timeout, self._on_timeout, worker, run)
        if run.max_memory is not None:
            run.mem_timer = loop.call_later(self._mem_interval, self._check_memory, worker, run)

    def _release(self, worker: Worker) -> None:
        """``worker`` finished a run: give it the next queued one, or make it idle."""
        if worker.doomed:
            return
        if self._queue:
            self._dispatch(worker, self._queue.popleft())
            return
        self._sup.idle.append(worker)
        self._check_drained()

    def _abandon(self, run: Run) -> None:
        """The caller of ``run`` was cancelled."""
        if run.state == RunState.QUEUED:
            self._queue.remove(run)
            run.state = RunState.DONE
        elif run.state == RunState.RUNNING:
            for worker in self._sup.workers:
                if worker.run is run:
                    self._sup.kill(worker, None)
                    break
            self._settle(run)
        self._check_drained()

    # -- outcomes --------------------------------------------------------------------------

    def _on_reply(self, worker: Worker, frame: memoryview | bytes) -> None:
        run = worker.run
        if run is None or worker.doomed:
            return  # killed on purpose: that run's outcome was decided then
        worker.run = None
        self._busy -= 1
        self._sup.slots.clear(worker.slot)  # a worker that completes runs is healthy
        kind = frame[0]
        if kind == _wire.MEMORY:
            self._settle(run, exc=self._over_memory(worker, run, frame[1:]))
            self._check_drained()
            return
        # Hand the worker its next run before waking this run's caller: it stays busy.
        self._release(worker)
        if len(frame) > _LOOP_UNPICKLE_MAX:
            if self._unpickler is None:
                self._unpickler = ThreadPoolExecutor(1, thread_name_prefix="taskd-unpickle")
            loop = cast(asyncio.AbstractEventLoop, self._loop)
            job = loop.run_in_executor(self._unpickler, decode_reply, worker.pid, run.label, frame)
            job.add_done_callback(lambda done: self._settle(run, *done.result()))
            return
        value, exc = decode_reply(worker.pid, run.label, frame)
        self._settle(run, value, exc)

    def _over_memory(self, worker: Worker, run: Run, body: memoryview | bytes) -> BaseException:
        """An allocation failed at the run's ``max_memory`` in ``worker``, which then replied:
        the run fails, and the worker is replaced, since what the job left in its memory
        (half-built module state, a fragmented heap) is in doubt."""
        exc = decode_memory(worker.pid, run.label, cast(int, run.max_memory), body)
        self._sup.retire(worker, exc)
        return exc

    def _on_run_lost(self, run: Run, exc: BaseException) -> None:
        """The worker running ``run`` ended before it replied."""
        self._busy -= 1
        self._settle(run, exc=exc)
        self._check_drained()

    def _settle(self, run: Run, value: Any = None, exc: BaseException | None = None) -> None:
        run.state = RunState.DONE
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        if run.mem_timer is not None:
            run.mem_timer.cancel()
            run.mem_timer = None
        fut = run.fut
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    def _fail_queued(self, error: type[JobError], why: str) -> None:
        while self._queue:
            run = self._queue.popleft()
            self._settle(run, exc=error(f"{run.label}: {why}"))

    def _check_drained(self) -> None:
        fut = self._drained
        if fut is not None and not fut.done() and not self._busy and not self._queue:
            fut.set_result(None)

    # -- watching runs ---------------------------------------------------------------------

    def _on_timeout(self, worker: Worker, run: Run) -> None:
        if worker.run is not run:
            return
        self._sup.kill(
            worker,
            JobTimeout(
                f"{run.label} timed out after {run.timeout:g}s; its worker process "
                f"{worker.pid} was killed and is being replaced"
            ),
        )

    def _check_memory(self, worker: Worker, run: Run) -> None:
        run.mem_timer = None
        if worker.run is not run or worker.doomed or run.max_memory is None:
            return
        try:
            if worker.ps is None:
                worker.ps = psutil.Process(worker.pid)
            rss = worker.ps.memory_info().rss
        except psutil.Error:
            return  # it is exiting; the sentinel will say how
        if rss > run.max_memory:
            self._sup.kill(
                worker,
                MemoryLimitExceeded(
                    f"{run.label}: worker process {worker.pid} reached {rss} bytes RSS "
                    f"({mib(rss)}), over max_memory={run.max_memory} bytes "
                    f"({mib(run.max_memory)}); the worker was killed and is being replaced"
                ),
            )
            return
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        run.mem_timer = loop.call_later(self._mem_interval, self._check_memory, worker, run)
