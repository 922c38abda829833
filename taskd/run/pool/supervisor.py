"""The worker processes of a :class:`~taskd.run.pool.ProcessPool`: one supervisor task per
slot starts a worker, waits for it to end and starts the next, with a back-off after
unexpected ends; kills and clean stops; the exit status of each, read from its sentinel.

The pool decides about runs; this module tells it when a worker is free (``on_idle``), what a
worker replied (``on_reply``), that a worker ended while running a run (``on_run_lost``), and
that no worker can be started at all (``on_broken``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import cast

from taskd.errors import WorkerDied
from taskd.run import proctree
from taskd.run import worker as _wire
from taskd.run.pool import forkserver, records
from taskd.run.pool.channel import Channel
from taskd.run.pool.records import (
    Run,
    Slots,
    StartFailedError,
    Worker,
    describe_exit,
    log,
    restart_cause,
)

__all__ = ["Supervisor"]

# How long a worker that "exited with 255" is given to turn out lost with a dead forkserver.
_LOSS_CHECK = 0.5
# A worker reports ready after the forkserver has forked it; the very first start also waits
# for the forkserver itself to import the main module, which can take a while on a slow host.
_READY_TIMEOUT = 60.0
# How long a worker told to exit (its socket closed) or one that closed its own end gets
# before it is SIGKILLed.
_EXIT_GRACE = 2.0


class Supervisor:
    """Starts, watches, stops and replaces the worker processes of one pool."""

    def __init__(
        self,
        n: int,
        mp_context: str,
        worker_main: Callable[[socket.socket], None],
        *,
        on_idle: Callable[[Worker], None],
        on_reply: Callable[[Worker, memoryview | bytes], None],
        on_run_lost: Callable[[Run, BaseException], None],
        on_broken: Callable[[str], None],
    ) -> None:
        self.n = n
        self._mp_context = mp_context
        self._worker_main = worker_main
        self._on_idle = on_idle
        self._on_reply = on_reply
        self._on_run_lost = on_run_lost
        self._on_broken = on_broken
        self.closing = False
        self.workers: set[Worker] = set()  # every worker with a process, starting or not
        self.live: set[Worker] = set()  # reported ready and not yet exited
        self.idle: list[Worker] = []
        self.slots = Slots(n)
        # Why no run can be served (every slot failed to start repeatedly), or None.
        self.broken: str | None = None
        # Workers replaced, by cause (timeout, memory, died, start_failed): for metrics.
        self.restarts: Counter[str] = Counter()
        self.tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: BaseContext | None = None
        self._spawner: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        self._startup: asyncio.Future[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Start a supervisor task per slot; the future resolves once every slot has a
        worker up or has given up starting one."""
        self._loop = loop
        ctx = multiprocessing.get_context(self._mp_context)
        if self._mp_context == "forkserver":
            # With the worker module preloaded, a fork starts with its serving loop imported.
            # "__main__" is multiprocessing's own default: where the forkserver is given the
            # main path (3.11's is not), workers skip re-running the main script; otherwise
            # each worker runs it as "__mp_main__" at start, as stdlib pools do.
            ctx.set_forkserver_preload(["__main__", _wire.__name__])
        self._ctx = ctx
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskd-procpool")
        self._wake = asyncio.Event()
        self._startup = startup = loop.create_future()
        self.tasks = [
            loop.create_task(self._supervise(slot), name=f"taskd-procpool-slot-{slot}")
            for slot in range(self.n)
        ]
        return startup

    def begin_closing(self) -> None:
        self.closing = True
        if self._wake is not None:
            self._wake.set()

    def shutdown_spawner(self) -> None:
        if self._spawner is not None and all(t.done() for t in self.tasks):
            self._spawner.shutdown(wait=False)

    def end_all(self, why: str, *, gently: bool) -> None:
        """Kill every worker (a running run fails with :class:`WorkerDied` saying ``why``);
        with ``gently``, idle ones are asked to exit instead."""
        for worker in list(self.workers):
            run = worker.run
            if run is not None:
                self.kill(worker, WorkerDied(f"{run.label}: worker process {worker.pid} {why}"))
            elif gently and worker in self.live:
                self.stop(worker)
            else:
                self.kill(worker, None)

    # -- one slot --------------------------------------------------------------------------

    async def _supervise(self, slot: int) -> None:
        """Keep one worker alive in ``slot`` until the pool closes."""
        slots = self.slots
        failures = 0
        wait = 0.0  # before the next start: the back-off after an unexpected end
        while not self.closing:
            if wait:
                await self._pause(wait)
                if self.closing:
                    break
            try:
                worker = await self._spawn(slot)
            except Exception as exc:  # out of fds or processes, say: the slot must not die
                if self.closing:
                    break
                failures += 1
                why = str(exc) if isinstance(exc, StartFailedError) else f"{exc!r}"
                wait = slots.strike(slot, why)
                self._on_start_failed(slot, failures, why, wait)
                continue
            failures = 0
            slots.failures[slot] = 0
            slots.up[slot] = True
            self.broken = None
            if worker.returncode is None:  # it may have died between ready and now
                self.live.add(worker)
            self._check_startup()
            if self.closing:
                self.stop(worker)
            else:
                self._on_idle(worker)
            # Up this long without dying on its own: whatever killed its predecessors has
            # stopped (runs or no runs), and the slot starts again from a clean record.
            await asyncio.wait((worker.exited,), timeout=records.STABLE_AFTER)
            if not worker.exited.done():
                slots.clear(slot)
                await worker.exited
            slots.up[slot] = False
            wait = worker.respawn_in
        slots.up[slot] = False

    async def _spawn(self, slot: int) -> Worker:
        """Start one worker process and wait until it reports ready."""
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        ctx = cast(BaseContext, self._ctx)
        worker = Worker(slot, loop)
        parent_sock, child_sock = socket.socketpair()
        try:
            await loop.create_unix_connection(
                lambda: Channel(worker, self._on_frame, self._on_channel_lost), sock=parent_sock
            )
        except BaseException:
            parent_sock.close()
            child_sock.close()
            raise
        proc: BaseProcess = ctx.Process(  # type: ignore[attr-defined]
            target=self._worker_main,
            args=(child_sock,),
            name=f"taskd-procpool-{slot}",
            daemon=True,  # a backstop: multiprocessing terminates daemonic children at exit
        )
        try:
            worker.forkserver, dead = await loop.run_in_executor(
                self._spawner, forkserver.start_process, proc, self._mp_context
            )
        except Exception as exc:
            worker.doomed = True
            cast(asyncio.Transport, worker.transport).close()
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise StartFailedError(f"could not start a worker process: {why}") from exc
        finally:
            child_sock.close()  # the child has its own copy now
        if dead:
            log.warning("procpool.forkserver_replaced", dead=dead, new=worker.forkserver)
        worker.proc = proc
        worker.pid = cast(int, proc.pid)
        self.workers.add(worker)
        loop.add_reader(proc.sentinel, self._on_sentinel, worker)
        if self.closing:
            self.kill(worker, None)
        try:
            ready = await asyncio.wait_for(asyncio.shield(worker.ready), _READY_TIMEOUT)
        except TimeoutError:
            self.kill(worker, None)
            await worker.exited
            raise StartFailedError(
                f"worker process {worker.pid} did not report ready within {_READY_TIMEOUT:g}s"
            ) from None
        if not ready:
            await worker.exited
            raise StartFailedError(
                f"worker process {worker.pid} "
                f"{describe_exit(cast(int, worker.returncode))} before it was ready"
            )
        return worker

    async def _pause(self, delay: float) -> None:
        wake = cast(asyncio.Event, self._wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), delay)

    def _on_start_failed(self, slot: int, failures: int, why: str, delay: float) -> None:
        self.restarts["start_failed"] += 1
        self.slots.failures[slot] = failures
        log.error(
            "procpool.worker_start_failed", slot=slot, attempt=failures, error=why, retry_in=delay
        )
        if not self.live and self.slots.all_given_up():
            self.broken = (
                f"the process pool cannot start worker processes ({failures} attempts in a "
                f"row failed, the last: {why}); it keeps retrying in the background"
            )
            self._on_broken(self.broken)
        self._check_startup()

    def _check_startup(self) -> None:
        fut = self._startup
        if fut is not None and not fut.done() and self.slots.all_settled():
            fut.set_result(None)

    # -- ending workers --------------------------------------------------------------------

    def kill(self, worker: Worker, reason: BaseException | None) -> None:
        """SIGKILL ``worker``; its run, if any, fails with ``reason`` once it is reaped."""
        if reason is not None and worker.kill_reason is None:
            worker.kill_reason = reason
        worker.expected = True
        self._doom(worker)
        if worker.returncode is None and worker.pid:
            # Whatever the run started goes with it (a job's subprocess must not outlive its
            # timeout), even a process that left the worker's group and session: the worker
            # is their subreaper, so they are all its descendants while it lives, and they
            # are frozen and killed before it is. Then the worker's process group (it leads
            # one, see worker.py), which also covers a system without /proc.
            # ProcessLookupError: already gone; the sentinel reports it.
            proctree.kill_tree(worker.pid, include_root=True)
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    def retire(self, worker: Worker, reason: BaseException) -> None:
        """Replace an idle ``worker`` whose last run (failed with ``reason``) left it in
        doubt: it is asked to exit, and its restart is counted by that reason."""
        if worker.kill_reason is None:
            worker.kill_reason = reason
        self.stop(worker)

    def stop(self, worker: Worker) -> None:
        """Ask an idle ``worker`` to exit (an empty frame, then end of file); kill it if it
        lingers."""
        worker.expected = True
        self._doom(worker)
        if worker.transport is not None:
            worker.transport.write(_wire.HEADER.pack(0))
            worker.transport.close()
        self._arm_kill(worker)

    def _doom(self, worker: Worker) -> None:
        worker.doomed = True
        if worker in self.idle:
            self.idle.remove(worker)

    def _arm_kill(self, worker: Worker) -> None:
        if worker.stop_timer is None and worker.returncode is None:
            loop = cast(asyncio.AbstractEventLoop, self._loop)
            worker.stop_timer = loop.call_later(_EXIT_GRACE, self.kill, worker, None)

    # -- what a worker says ----------------------------------------------------------------

    def _on_frame(self, worker: Worker, frame: memoryview | bytes) -> None:
        if frame[0] == _wire.READY:
            if not worker.ready.done():
                worker.ready.set_result(True)
            return
        self._on_reply(worker, frame)

    def _on_channel_lost(self, worker: Worker) -> None:
        if worker.doomed or worker.returncode is not None:
            return
        # Usually the process is dying and its sentinel is about to fire. If the job closed
        # the socket itself the worker is useless: it gets a moment, then SIGKILL.
        self._doom(worker)
        self._arm_kill(worker)

    def _on_sentinel(self, worker: Worker) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        proc = cast(BaseProcess, worker.proc)
        loop.remove_reader(proc.sentinel)
        self._collect_exit(worker)

    def _collect_exit(self, worker: Worker) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        proc = cast(BaseProcess, worker.proc)
        if not forkserver.MP_LOCK.acquire(blocking=False):
            loop.call_later(0.001, self._collect_exit, worker)  # a start holds it for ms
            return
        try:
            code = proc.exitcode
        finally:
            forkserver.MP_LOCK.release()
        if code is None:
            # fork/spawn children: the sentinel pipe closes a moment before the process can
            # be waited for.
            loop.call_later(0.001, self._collect_exit, worker)
            return
        if code == 255 and worker.forkserver and not worker.forkserver_lost:
            # 255 is also what multiprocessing reports when the forkserver died before it
            # could send the status (its workers die with it, of their parent-death signal).
            # Its end of the pipe closes a moment before it shows as dead: give it that
            # moment, so the run's error names the real cause. (The code itself is cached.)
            if forkserver.process_gone(worker.forkserver):
                worker.forkserver_lost = True
            else:
                now = loop.time()
                if not worker.loss_check_until:
                    worker.loss_check_until = now + _LOSS_CHECK
                if now < worker.loss_check_until:
                    loop.call_later(0.005, self._collect_exit, worker)
                    return
        self._on_exit(worker, code)

    def _on_exit(self, worker: Worker, code: int) -> None:
        worker.returncode = code
        if worker.stop_timer is not None:
            worker.stop_timer.cancel()
            worker.stop_timer = None
        self._doom(worker)
        self.workers.discard(worker)
        self.live.discard(worker)
        if worker.transport is not None:
            worker.transport.close()
        cast(BaseProcess, worker.proc).close()
        run = worker.run
        worker.run = None
        if not self.closing and worker.ready.done():
            self.restarts[restart_cause(worker)] += 1
        how = self._describe_loss(worker, code)
        if run is not None:
            exc = worker.kill_reason or WorkerDied(
                f"{run.label}: worker process {worker.pid} {how} while running it; the worker "
                f"is being replaced"
            )
            self._on_run_lost(run, exc)
        if not worker.expected and worker.ready.done():
            label = run.label if run is not None else None
            if not self.closing:
                what = f"worker process {worker.pid} {how}"
                worker.respawn_in = self.slots.strike(
                    worker.slot, f"{what} while running {label}" if label else what
                )
            log.warning(
                "procpool.worker_died",
                pid=worker.pid,
                exit=how,
                run=label,
                respawn_in=worker.respawn_in,
            )
        if not worker.ready.done():
            worker.ready.set_result(False)
        worker.exited.set_result(code)

    def _describe_loss(self, worker: Worker, code: int) -> str:
        if worker.forkserver_lost:
            return (
                f"was killed along with the forkserver process {worker.forkserver} that "
                f"started it, which died"
            )
        return describe_exit(code)
