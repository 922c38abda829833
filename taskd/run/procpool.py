"""The process pool that runs ``kind="cpu"`` jobs, with control over each worker.

Why not :class:`concurrent.futures.ProcessPoolExecutor`: when one of its workers dies every
pending future fails with ``BrokenProcessPool`` and the whole pool must be rebuilt, and one
worker cannot be killed (for a timeout, a memory limit, a cancelled run) without breaking all
the others. Here each worker is its own process with its own socket pair, so one can be killed
and replaced while the others keep going.

How it works:

* Workers come from a ``multiprocessing`` "forkserver" (safe to use from a threaded parent
  with a running loop; a replacement is a cheap fork of a small process that has already
  imported :mod:`taskd.run.worker`). Starting one is a blocking call into the forkserver, so
  it happens in a private thread; the per-run path never leaves the loop thread.
* Each worker runs one run at a time; runs wait in a FIFO queue when all are busy. The loop
  side of each socket pair is an asyncio transport with a small protocol that splits the
  stream into length-prefixed frames (see :mod:`taskd.run.worker` for the format), so a partial
  message never blocks the loop and a reply is handled in the callback that reads it.
* A worker's death is seen through its ``multiprocessing`` sentinel, watched with
  ``loop.add_reader``: for a forkserver child it turns readable once the forkserver has reaped
  the process and written its exit status, so "the process is gone" is a fact, not a guess.
  That fails only the run the worker was executing, and the worker's supervisor task starts a
  replacement.
* Crash loops are bounded: a slot whose workers keep ending without the pool asking (failed
  starts, crashes, kills from outside) waits longer before each replacement, and the pool
  reports itself :attr:`~ProcessPool.degraded` until a worker of that slot is healthy again.
* Timeouts, cancellation and memory limits SIGKILL the one worker; the run's outcome is
  decided when the signal is sent and delivered once the process is reaped.
* The daemon's signals (SIGHUP, SIGINT, SIGTERM) are the daemon's: sent to its process group
  (``kill -TERM -- -PID``, a terminal, ``systemctl kill``) or to a pool process directly, they
  kill neither the forkserver nor a worker, so a stop drains runs and a reload keeps them. A
  forkserver that dies anyway (SIGKILL) takes its workers with it (their parent-death signal)
  and is replaced at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import types
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import resource_tracker
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, ClassVar, TypeVar, cast

import psutil
import structlog

from taskd.errors import JobError, JobTimeout, MemoryLimitExceeded, WorkerDied
from taskd.run import worker as _wire

__all__ = ["ProcessPool"]

T = TypeVar("T")

log = structlog.get_logger(__name__)

# A slot whose worker fails to come up this many times in a row counts as unable to start;
# when every slot is in that state and none is up, queued and new runs fail instead of waiting.
_GIVE_UP_AFTER = 3
# Each failed start or unexpected death in a row (a "strike") doubles the wait before the
# slot's next start, from _BACKOFF_FIRST up to _BACKOFF_MAX: a job that segfaults on every run,
# or something that kills every new worker, costs a few forks a minute, not five a second.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 30.0
# A worker that completes a run, or stays up this long, clears its slot's strikes.
_STABLE_AFTER = 10.0
# This many strikes in a row in one slot and the pool reports itself degraded.
_DEGRADED_AFTER = 3
# How long a worker that "exited with 255" is given to turn out lost with a dead forkserver.
_LOSS_CHECK = 0.5
# A worker reports ready after the forkserver has forked it; the very first start also waits
# for the forkserver itself to import the main module, which can take a while on a slow host.
_READY_TIMEOUT = 60.0
# How long a worker told to exit (its socket closed) or one that closed its own end gets
# before it is SIGKILLed.
_EXIT_GRACE = 2.0
_REF_CACHE_MAX = 1024

# ``Process.start()`` polls every other live child of this process (multiprocessing's
# ``_cleanup``), which for a forkserver child reads the exit status from its sentinel. Reading
# the same status on the loop thread at the same moment would lose it, so both hold this lock.
_MP_LOCK = threading.Lock()

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _StartFailedError(Exception):
    """A worker process could not be started or died before it reported ready."""


class _Run:
    """One call of :meth:`ProcessPool.run`, from submission to outcome."""

    __slots__ = ("frame", "fut", "label", "max_memory", "mem_timer", "state", "timeout", "timer")

    def __init__(
        self,
        frame: bytes,
        fut: asyncio.Future[Any],
        label: str,
        timeout: float | None,
        max_memory: int | None,
    ) -> None:
        self.frame = frame
        self.fut = fut
        self.label = label
        self.timeout = timeout
        self.max_memory = max_memory
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.mem_timer: asyncio.TimerHandle | None = None


class _Worker:
    """Parent-side record of one worker process."""

    __slots__ = (
        "doomed",
        "exited",
        "expected",
        "forkserver",
        "forkserver_lost",
        "kill_reason",
        "loss_check_until",
        "pid",
        "proc",
        "ps",
        "ran",
        "ready",
        "respawn_in",
        "returncode",
        "run",
        "slot",
        "stop_timer",
        "transport",
    )

    def __init__(self, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        self.slot = slot
        self.proc: BaseProcess | None = None
        self.pid = 0
        self.transport: asyncio.Transport | None = None
        # True once the worker reported ready, False if it exited first; never an exception,
        # so nobody is left holding an unretrieved one.
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.returncode: int | None = None
        self.run: _Run | None = None
        # Set once the pool has decided this worker goes (killed, told to exit, lost its
        # socket): it takes no more runs and whatever it still sends is ignored.
        self.doomed = False
        # Set when the pool itself ends the worker; any other exit is a death worth a log.
        self.expected = False
        self.kill_reason: BaseException | None = None
        self.ran = False
        self.ps: psutil.Process | None = None
        self.stop_timer: asyncio.TimerHandle | None = None
        # The forkserver that forked it (0: another start method), whether the worker was
        # lost with it, and until when to look for that (see _collect_exit).
        self.forkserver = 0
        self.forkserver_lost = False
        self.loss_check_until = 0.0
        # Set when it died unexpectedly: how long its slot waits before starting another.
        self.respawn_in = 0.0


class _Channel(asyncio.Protocol):
    """Splits a worker's byte stream into frames and hands each to the pool."""

    __slots__ = ("_buf", "_pool", "_worker")

    def __init__(self, pool: ProcessPool, worker: _Worker) -> None:
        self._pool = pool
        self._worker = worker
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._worker.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        header = _wire.HEADER
        hsize = header.size
        if not self._buf:
            # Common case: whole small frames in one read; parse them without copying.
            pos, size = 0, len(data)
            view = memoryview(data)
            while size - pos >= hsize:
                (length,) = header.unpack_from(data, pos)
                end = pos + hsize + length
                if end > size:
                    break
                self._pool._on_frame(self._worker, view[pos + hsize : end])
                pos = end
            if pos < size:
                self._buf += view[pos:]
            return
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= hsize:
            (length,) = header.unpack_from(buf, pos)
            end = pos + hsize + length
            if end > len(buf):
                break
            # A copy: a view would pin the bytearray and forbid trimming it below.
            self._pool._on_frame(self._worker, bytes(buf[pos + hsize : end]))
            pos = end
        if pos:
            del buf[:pos]

    def eof_received(self) -> bool | None:
        self._pool._on_channel_lost(self._worker)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool._on_channel_lost(self._worker)


def _restart_cause(worker: _Worker) -> str:
    """Why a worker (that was up) is being replaced, for the restart counter: its run's
    timeout or memory limit; ``killed`` when taskd killed it on purpose for another reason
    (its run was cancelled, its channel was lost); ``died`` when nobody meant it to go."""
    reason = worker.kill_reason
    if isinstance(reason, JobTimeout):
        return "timeout"
    if isinstance(reason, MemoryLimitExceeded):
        return "memory"
    return "killed" if worker.expected else "died"


def _shield_helpers(start_method: str) -> None:
    """Block the daemon's signals in this (the spawner) thread before a start.

    A thread's signal mask survives fork and exec, so every helper multiprocessing launches
    from this thread (the forkserver, the resource tracker, "spawn" workers) starts with them
    blocked: a SIGTERM or SIGHUP to the daemon's process group, or to the forkserver itself,
    stays pending for ever instead of killing the forkserver and, through their parent-death
    signal, every worker it forked. Nothing in those helpers wants these signals: they exit
    when the daemon's end of their pipe closes. Workers unblock them first thing (see
    worker.py). The daemon is unaffected: the kernel hands a process-directed signal to a
    thread that does not block it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _wire.DAEMON_SIGNALS)
    if start_method != "fork":
        # multiprocessing launches its resource tracker, when it is not running, in the
        # same call that launches the forkserver, and then unblocks SIGINT and SIGTERM in the
        # calling thread (its own way of keeping them from the tracker, which ignores them):
        # the forkserver would start without them blocked. Launched here, the tracker is
        # left alone then, and the mask is whole again for what comes next.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, _wire.DAEMON_SIGNALS)


def _forkserver_server() -> Any:
    """multiprocessing's forkserver singleton, or None if it was never imported."""
    return getattr(sys.modules.get("multiprocessing.forkserver"), "_forkserver", None)


def _forkserver_pid() -> int:
    pid = getattr(_forkserver_server(), "_forkserver_pid", None)
    return pid if isinstance(pid, int) else 0


def _forget_dead_forkserver() -> int:
    """If the forkserver has died, make the next start launch a new one; return its pid if it
    had died, else 0.

    multiprocessing replaces a dead forkserver only when it can reap it itself: one reaped by
    other code (a plugin's ``os.wait()``, SIGCHLD set to SIG_IGN) makes every later start fail
    with ChildProcessError, for ever. This does what ``ensure_running`` does with a dead one.
    Private state of the stdlib's, read defensively: the pool's only hook into it.
    """
    server = _forkserver_server()
    lock = getattr(server, "_lock", None)
    if lock is None:
        return 0
    with lock:
        pid = getattr(server, "_forkserver_pid", None)
        if not isinstance(pid, int):
            return 0
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            reaped = pid
        if not reaped:
            return 0  # still running: the start failed for another reason
        fd = getattr(server, "_forkserver_alive_fd", None)
        if isinstance(fd, int):
            with contextlib.suppress(OSError):
                os.close(fd)
        server._forkserver_alive_fd = None
        server._forkserver_address = None
        server._forkserver_pid = None
    return pid


def _start_process(proc: BaseProcess, start_method: str) -> tuple[int, int]:
    """Start ``proc``; return the pid of the forkserver that forked it (0 for none) and that
    of a dead one it replaced (0 if none)."""
    forkserver = start_method == "forkserver"
    with _MP_LOCK:
        _shield_helpers(start_method)
        dead = 0
        try:
            proc.start()
        except (OSError, EOFError):
            # A forkserver that died since the last start: refused connection, lost reply,
            # or reaped by someone else. Once more with a new one; any other failure stands.
            dead = _forget_dead_forkserver() if forkserver else 0
            if not dead:
                raise
            _shield_helpers(start_method)
            proc.start()
        return (_forkserver_pid() if forkserver else 0), dead


def _process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _backoff(strikes: int) -> float:
    """The wait before a slot's next start after ``strikes`` unexpected ends in a row."""
    return min(_BACKOFF_FIRST * 2 ** (strikes - 1), _BACKOFF_MAX) if strikes > 0 else 0.0


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = {
            "SIGKILL": " (killed from outside, or by the out-of-memory killer)",
            "SIGSEGV": " (a crash in native code)",
            "SIGBUS": " (a crash in native code)",
            "SIGABRT": " (aborted, usually by native code)",
        }.get(name, "")
        return f"was killed by signal {name}{hint}"
    return f"exited with code {code}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _reference(func: Callable[..., Any]) -> bytes:
    """The pickled ``(module, qualname, file, version)`` naming ``func``, or b"" to send it
    by value.

    By reference, because a function defined in a drop-in file (loaded by path under a
    synthetic module name) cannot be found by plain pickle in the worker; the file path lets
    the worker load it the same way. ``version`` identifies the module's namespace in this
    process, so a worker notices when the parent has loaded the file again.
    """
    if not isinstance(func, types.FunctionType | types.BuiltinFunctionType | type):
        return b""  # partials, bound methods, callable instances: pickle handles them
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return b""  # lambdas and nested functions: pickling them raises a clear error
    path = getattr(sys.modules.get(module), "__file__", None)
    version = None
    if isinstance(func, types.FunctionType):
        version = id(func.__globals__)
        filename = func.__code__.co_filename
        if path is None and not filename.startswith("<"):
            path = filename
    return pickle.dumps((module, qualname, path, version), pickle.HIGHEST_PROTOCOL)


def _label_of(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module else str(name)


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
        self._n = n
        self._mp_context = mp_context
        self._mem_interval = memory_check_interval
        self._started = False
        self._closing = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: BaseContext | None = None
        self._spawner: ThreadPoolExecutor | None = None
        self._workers: set[_Worker] = set()  # every worker with a process, starting or not
        self._live: set[_Worker] = set()  # reported ready and not yet exited
        self._idle: list[_Worker] = []
        self._queue: deque[_Run] = deque()
        self._busy = 0
        self._supervisors: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._slot_up = [False] * n
        self._slot_failures = [0] * n  # failed starts in a row: for giving up on runs
        # Failed starts and unexpected deaths in a row, and what the last one was: for the
        # back-off and for reporting the pool degraded.
        self._slot_strikes = [0] * n
        self._slot_last = [""] * n
        self._degraded: str | None = None
        self._startup: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._broken: str | None = None
        # callable -> (its reference for the worker, its default label)
        self._refs: dict[Any, tuple[bytes, str]] = {}
        # Workers replaced, by cause (timeout, memory, died, start_failed): for metrics.
        self.restarts: Counter[str] = Counter()

    # -- public API ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Workers that are up and accept runs (busy or idle)."""
        return sum(1 for w in self._live if not w.doomed)

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
        return sorted(w.pid for w in self._live if not w.doomed)

    @property
    def degraded(self) -> str | None:
        """Why the pool is short of workers, or None when it is healthy.

        Set once some slot's workers have failed to start or died unexpectedly
        ``_DEGRADED_AFTER`` times in a row (a job that crashes on every run, something that
        kills each new worker); each replacement then waits longer, up to ``_BACKOFF_MAX``
        seconds. Cleared by itself once a worker of that slot completes a run or stays up
        ``_STABLE_AFTER`` seconds. Logged as ``procpool.degraded`` and ``procpool.recovered``.
        """
        return self._degraded

    async def start(self) -> None:
        """Start the workers; return once each is ready (or cannot be started).

        Raises :class:`~taskd.errors.JobError` if no worker could be started at all.
        """
        if self._started:
            raise RuntimeError("ProcessPool.start() was already called")
        self._started = True
        self._loop = loop = asyncio.get_running_loop()
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
        self._startup = loop.create_future()
        self._supervisors = [
            loop.create_task(self._supervise(slot), name=f"taskd-procpool-slot-{slot}")
            for slot in range(self._n)
        ]
        try:
            await self._startup
        except BaseException:
            self.kill()
            await self.close()
            raise
        if not self._live:
            reason = self._broken or "no worker process could be started"
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
        """
        if not self._started:
            raise RuntimeError("call ProcessPool.start() before run()")
        if self._closing:
            raise JobError(
                f"{label or _label_of(func)}: the process pool is closed; the run was not started"
            )
        if self._broken is not None:
            raise JobError(f"{label or _label_of(func)}: {self._broken}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_memory is not None and max_memory <= 0:
            raise ValueError(f"max_memory must be > 0 bytes, got {max_memory}")
        # Pickling happens here, so arguments that cannot be sent fail in the caller.
        frame, default_label = self._encode(func, args, kwargs)
        run = _Run(
            frame,
            cast(asyncio.AbstractEventLoop, self._loop).create_future(),
            label or default_label,
            timeout,
            max_memory,
        )
        if self._idle:
            self._dispatch(self._idle.pop(), run)
        else:
            self._queue.append(run)
        try:
            return cast(T, await run.fut)
        except asyncio.CancelledError:
            self._abandon(run)
            raise

    async def close(self, *, timeout: float | None = None) -> None:
        """Stop taking runs, let running and queued ones finish for up to ``timeout`` seconds
        (None: no limit), then kill what is left (those runs raise :class:`WorkerDied`);
        return once every worker process is gone. Cancelling it kills the workers at once."""
        if not self._started or self._closed:
            self._closed = True
            return
        self._begin_closing()
        try:
            if self._busy or self._queue:
                loop = cast(asyncio.AbstractEventLoop, self._loop)
                self._drained = drained = loop.create_future()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(drained), timeout)
            self._stop_workers(f"killed by ProcessPool.close() after its timeout of {timeout}s")
            await asyncio.gather(*self._supervisors)
        except BaseException:
            self.kill()
            raise
        finally:
            if self._spawner is not None and all(t.done() for t in self._supervisors):
                self._spawner.shutdown(wait=False)
        self._closed = True

    def kill(self) -> None:
        """SIGKILL every worker now: executing and queued runs fail with :class:`WorkerDied`.

        Await :meth:`close` afterwards to reap the processes.
        """
        if not self._started:
            return
        self._begin_closing()
        self._fail_queued(WorkerDied, "the process pool was killed before the run started")
        for worker in list(self._workers):
            run = worker.run
            reason = None
            if run is not None:
                reason = WorkerDied(
                    f"{run.label}: worker process {worker.pid} was killed by ProcessPool.kill()"
                )
            self._kill(worker, reason)

    async def __aenter__(self) -> ProcessPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- submission ------------------------------------------------------------------------

    def _encode(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any] | None
    ) -> tuple[bytes, str]:
        """The request frame for one run, and the label to use when the caller gave none."""
        try:
            cached = self._refs.get(func)
        except TypeError:  # an unhashable callable
            cached = None
        if cached is None:
            cached = (_reference(func), _label_of(func))
            if len(self._refs) >= _REF_CACHE_MAX:
                self._refs.clear()
            with contextlib.suppress(TypeError):  # unhashable: just not cached
                self._refs[func] = cached
        ref, label = cached
        kw = dict(kwargs) if kwargs else {}
        if ref:
            payload = pickle.dumps((args, kw), pickle.HIGHEST_PROTOCOL)
        else:
            payload = pickle.dumps((func, args, kw), pickle.HIGHEST_PROTOCOL)
        ref_len = _wire.REF_LEN.size + len(ref)
        frame = b"".join(
            (_wire.HEADER.pack(ref_len + len(payload)), _wire.REF_LEN.pack(len(ref)), ref, payload)
        )
        return frame, label

    def _dispatch(self, worker: _Worker, run: _Run) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        worker.run = run
        worker.ran = True
        run.state = _RUNNING
        self._busy += 1
        cast(asyncio.Transport, worker.transport).write(run.frame)
        run.frame = b""  # the transport has it now; do not hold big arguments twice
        if run.timeout is not None:
            run.timer = loop.call_later(run.timeout, self._on_timeout, worker, run)
        if run.max_memory is not None:
            run.mem_timer = loop.call_later(self._mem_interval, self._check_memory, worker, run)

    def _release(self, worker: _Worker) -> None:
        """``worker`` finished a run: give it the next queued one, or make it idle."""
        if worker.doomed:
            return
        if self._queue:
            self._dispatch(worker, self._queue.popleft())
            return
        self._idle.append(worker)
        self._check_drained()

    def _abandon(self, run: _Run) -> None:
        """The caller of ``run`` was cancelled."""
        if run.state == _QUEUED:
            self._queue.remove(run)
            run.state = _DONE
        elif run.state == _RUNNING:
            for worker in self._workers:
                if worker.run is run:
                    self._kill(worker, None)
                    break
            self._settle(run)
        self._check_drained()

    # -- replies ---------------------------------------------------------------------------

    def _on_frame(self, worker: _Worker, frame: memoryview | bytes) -> None:
        kind = frame[0]
        if kind == _wire.READY:
            if not worker.ready.done():
                worker.ready.set_result(True)
            return
        run = worker.run
        if run is None or worker.doomed:
            return  # killed on purpose: that run's outcome was decided then
        worker.run = None
        self._busy -= 1
        if self._slot_strikes[worker.slot]:
            self._clear_strikes(worker.slot)  # a worker that completes runs is healthy
        # Hand the worker its next run before waking this run's caller: it stays busy.
        self._release(worker)
        try:
            if kind == _wire.OK:
                self._settle(run, value=pickle.loads(frame[1:]))
            else:
                self._settle(run, exc=self._remote_error(worker, run, frame[1:]))
        except Exception as exc:
            self._settle(
                run,
                exc=JobError(
                    f"{run.label}: the reply from worker process {worker.pid} could not be "
                    f"unpickled in the daemon: {type(exc).__qualname__}: {exc}"
                ),
            )

    def _remote_error(self, worker: _Worker, run: _Run, body: memoryview | bytes) -> BaseException:
        blob, summary, text = pickle.loads(body)
        note = f"Remote traceback (worker process {worker.pid}, {run.label}):\n{text.rstrip()}"
        exc: object = None
        if blob is not None:
            try:
                exc = pickle.loads(blob)
            except Exception:
                exc = None  # e.g. an __init__ that does not accept its own args back
        # SystemExit, KeyboardInterrupt and the like would stop the daemon's loop if raised
        # in it, and a future refuses StopIteration: those travel as JobError.
        if isinstance(exc, Exception) and not isinstance(exc, StopIteration):
            exc.add_note(note)
            return exc
        err = JobError(summary)
        err.add_note(note)
        if isinstance(exc, BaseException):
            err.__cause__ = exc
        return err

    def _settle(self, run: _Run, *, value: Any = None, exc: BaseException | None = None) -> None:
        run.state = _DONE
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

    # -- watching runs ---------------------------------------------------------------------

    def _on_timeout(self, worker: _Worker, run: _Run) -> None:
        if worker.run is not run:
            return
        self._kill(
            worker,
            JobTimeout(
                f"{run.label} timed out after {run.timeout:g}s; its worker process "
                f"{worker.pid} was killed and is being replaced"
            ),
        )

    def _check_memory(self, worker: _Worker, run: _Run) -> None:
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
            self._kill(
                worker,
                MemoryLimitExceeded(
                    f"{run.label}: worker process {worker.pid} reached {rss} bytes RSS "
                    f"({_mib(rss)}), over max_memory={run.max_memory} bytes "
                    f"({_mib(run.max_memory)}); the worker was killed and is being replaced"
                ),
            )
            return
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        run.mem_timer = loop.call_later(self._mem_interval, self._check_memory, worker, run)

    # -- worker life cycle -----------------------------------------------------------------

    async def _supervise(self, slot: int) -> None:
        """Keep one worker alive in ``slot`` until the pool closes."""
        failures = 0
        wait = 0.0  # before the next start: the back-off after an unexpected end
        while not self._closing:
            if wait:
                await self._pause(wait)
                if self._closing:
                    break
            try:
                worker = await self._spawn(slot)
            except Exception as exc:  # out of fds or processes, say: the slot must not die
                if self._closing:
                    break
                failures += 1
                why = str(exc) if isinstance(exc, _StartFailedError) else f"{exc!r}"
                wait = self._strike(slot, why)
                self._on_start_failed(slot, failures, why, wait)
                continue
            failures = 0
            self._slot_failures[slot] = 0
            self._slot_up[slot] = True
            self._broken = None
            if worker.returncode is None:  # it may have died between ready and now
                self._live.add(worker)
            self._check_startup()
            if self._closing:
                self._stop(worker)
            else:
                self._release(worker)
            # Up this long without dying on its own: whatever killed its predecessors has
            # stopped (runs or no runs), and the slot starts again from a clean record.
            await asyncio.wait((worker.exited,), timeout=_STABLE_AFTER)
            if not worker.exited.done():
                self._clear_strikes(slot)
                await worker.exited
            self._slot_up[slot] = False
            wait = worker.respawn_in
        self._slot_up[slot] = False

    async def _spawn(self, slot: int) -> _Worker:
        """Start one worker process and wait until it reports ready."""
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        ctx = cast(BaseContext, self._ctx)
        worker = _Worker(slot, loop)
        parent_sock, child_sock = socket.socketpair()
        try:
            await loop.create_unix_connection(lambda: _Channel(self, worker), sock=parent_sock)
        except BaseException:
            parent_sock.close()
            child_sock.close()
            raise
        proc: BaseProcess = ctx.Process(  # type: ignore[attr-defined]
            target=type(self).worker_main,
            args=(child_sock,),
            name=f"taskd-procpool-{slot}",
            daemon=True,  # a backstop: multiprocessing terminates daemonic children at exit
        )
        try:
            worker.forkserver, dead = await loop.run_in_executor(
                self._spawner, _start_process, proc, self._mp_context
            )
        except Exception as exc:
            worker.doomed = True
            cast(asyncio.Transport, worker.transport).close()
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise _StartFailedError(f"could not start a worker process: {why}") from exc
        finally:
            child_sock.close()  # the child has its own copy now
        if dead:
            log.warning("procpool.forkserver_replaced", dead=dead, new=worker.forkserver)
        worker.proc = proc
        worker.pid = cast(int, proc.pid)
        self._workers.add(worker)
        loop.add_reader(proc.sentinel, self._on_sentinel, worker)
        if self._closing:
            self._kill(worker, None)
        try:
            ready = await asyncio.wait_for(asyncio.shield(worker.ready), _READY_TIMEOUT)
        except TimeoutError:
            self._kill(worker, None)
            await worker.exited
            raise _StartFailedError(
                f"worker process {worker.pid} did not report ready within {_READY_TIMEOUT:g}s"
            ) from None
        if not ready:
            await worker.exited
            raise _StartFailedError(
                f"worker process {worker.pid} "
                f"{_describe_exit(cast(int, worker.returncode))} before it was ready"
            )
        return worker

    async def _pause(self, delay: float) -> None:
        wake = cast(asyncio.Event, self._wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), delay)

    def _on_start_failed(self, slot: int, failures: int, why: str, delay: float) -> None:
        self.restarts["start_failed"] += 1
        self._slot_failures[slot] = failures
        log.error(
            "procpool.worker_start_failed", slot=slot, attempt=failures, error=why, retry_in=delay
        )
        if not self._live and all(f >= _GIVE_UP_AFTER for f in self._slot_failures):
            self._broken = (
                f"the process pool cannot start worker processes ({failures} attempts in a "
                f"row failed, the last: {why}); it keeps retrying in the background"
            )
            self._fail_queued(JobError, self._broken)
        self._check_startup()

    def _strike(self, slot: int, what: str) -> float:
        """``slot``'s worker failed to start or died unexpectedly (``what``); return how long
        the slot waits before its next start."""
        strikes = self._slot_strikes[slot] = self._slot_strikes[slot] + 1
        self._slot_last[slot] = what
        self._check_health()
        return _backoff(strikes)

    def _clear_strikes(self, slot: int) -> None:
        self._slot_strikes[slot] = 0
        self._check_health()

    def _check_health(self) -> None:
        """Report the pool degraded, or recovered, when the worst slot's record crosses
        the line; each change is logged once."""
        worst = max(range(self._n), key=self._slot_strikes.__getitem__)
        strikes = self._slot_strikes[worst]
        if strikes >= _DEGRADED_AFTER:
            reason = (
                f"cpu worker processes keep failing ({strikes} in a row; the last: "
                f"{self._slot_last[worst]}); each replacement waits longer, now "
                f"{_backoff(strikes):g}s, at most {_BACKOFF_MAX:g}s"
            )
            if self._degraded is None:
                log.warning("procpool.degraded", reason=reason)
            self._degraded = reason
        elif self._degraded is not None:
            self._degraded = None
            log.info("procpool.recovered")

    def _check_startup(self) -> None:
        fut = self._startup
        if fut is None or fut.done():
            return
        if all(
            up or f >= _GIVE_UP_AFTER
            for up, f in zip(self._slot_up, self._slot_failures, strict=True)
        ):
            fut.set_result(None)

    def _kill(self, worker: _Worker, reason: BaseException | None) -> None:
        """SIGKILL ``worker``; its run, if any, fails with ``reason`` once it is reaped."""
        if reason is not None and worker.kill_reason is None:
            worker.kill_reason = reason
        worker.expected = True
        self._doom(worker)
        if worker.returncode is None and worker.pid:
            # The worker leads its own process group (see worker.py): killing the group
            # takes whatever the run started along (a job's subprocess must not outlive its
            # timeout). ProcessLookupError: already gone; the sentinel reports it.
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    def _stop(self, worker: _Worker) -> None:
        """Ask an idle ``worker`` to exit (an empty frame, then end of file); kill it if it
        lingers."""
        worker.expected = True
        self._doom(worker)
        if worker.transport is not None:
            worker.transport.write(_wire.HEADER.pack(0))
            worker.transport.close()
        self._arm_kill(worker)

    def _doom(self, worker: _Worker) -> None:
        worker.doomed = True
        if worker in self._idle:
            self._idle.remove(worker)

    def _arm_kill(self, worker: _Worker) -> None:
        if worker.stop_timer is None and worker.returncode is None:
            loop = cast(asyncio.AbstractEventLoop, self._loop)
            worker.stop_timer = loop.call_later(_EXIT_GRACE, self._kill, worker, None)

    def _on_channel_lost(self, worker: _Worker) -> None:
        if worker.doomed or worker.returncode is not None:
            return
        # Usually the process is dying and its sentinel is about to fire. If the job closed
        # the socket itself the worker is useless: it gets a moment, then SIGKILL.
        self._doom(worker)
        self._arm_kill(worker)

    def _on_sentinel(self, worker: _Worker) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        proc = cast(BaseProcess, worker.proc)
        loop.remove_reader(proc.sentinel)
        self._collect_exit(worker)

    def _collect_exit(self, worker: _Worker) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        proc = cast(BaseProcess, worker.proc)
        if not _MP_LOCK.acquire(blocking=False):
            loop.call_later(0.001, self._collect_exit, worker)  # a start holds it for ms
            return
        try:
            code = proc.exitcode
        finally:
            _MP_LOCK.release()
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
            if _process_gone(worker.forkserver):
                worker.forkserver_lost = True
            else:
                now = loop.time()
                if not worker.loss_check_until:
                    worker.loss_check_until = now + _LOSS_CHECK
                if now < worker.loss_check_until:
                    loop.call_later(0.005, self._collect_exit, worker)
                    return
        self._on_exit(worker, code)

    def _on_exit(self, worker: _Worker, code: int) -> None:
        worker.returncode = code
        if worker.stop_timer is not None:
            worker.stop_timer.cancel()
            worker.stop_timer = None
        self._doom(worker)
        self._workers.discard(worker)
        self._live.discard(worker)
        if worker.transport is not None:
            worker.transport.close()
        cast(BaseProcess, worker.proc).close()
        run = worker.run
        worker.run = None
        if not self._closing and worker.ready.done():
            self.restarts[_restart_cause(worker)] += 1
        how = self._describe_loss(worker, code)
        if run is not None:
            self._busy -= 1
            exc = worker.kill_reason or WorkerDied(
                f"{run.label}: worker process {worker.pid} {how} while running it; the worker "
                f"is being replaced"
            )
            self._settle(run, exc=exc)
        if not worker.expected and worker.ready.done():
            label = run.label if run is not None else None
            if not self._closing:
                what = f"worker process {worker.pid} {how}"
                worker.respawn_in = self._strike(
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
        self._check_drained()

    def _describe_loss(self, worker: _Worker, code: int) -> str:
        if worker.forkserver_lost:
            return (
                f"was killed along with the forkserver process {worker.forkserver} that "
                f"started it, which died"
            )
        return _describe_exit(code)

    # -- shutting down ---------------------------------------------------------------------

    def _begin_closing(self) -> None:
        self._closing = True
        if self._wake is not None:
            self._wake.set()

    def _stop_workers(self, why: str) -> None:
        self._fail_queued(WorkerDied, "the process pool closed before the run started")
        for worker in list(self._workers):
            run = worker.run
            if run is not None:
                self._kill(worker, WorkerDied(f"{run.label}: worker process {worker.pid} {why}"))
            elif worker in self._live:
                self._stop(worker)
            else:
                self._kill(worker, None)  # still starting: nothing to lose

    def _check_drained(self) -> None:
        fut = self._drained
        if fut is not None and not fut.done() and not self._busy and not self._queue:
            fut.set_result(None)
