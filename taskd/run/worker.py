"""The loop that runs inside each process-pool worker (see :mod:`taskd.run.pool`).

This module is preloaded by the forkserver, so every worker starts with it already imported;
keep its imports to the standard library and cheap modules, and import heavier ones lazily.

Wire format, both directions: frames of ``u64 big-endian length`` + body.

* parent -> worker, one per run: ``u64 max_memory`` + ``u64 max_pickle`` + ``u64 max_json``
  (bytes, 0 for none) + ``u32 ref length`` + ``ref`` + ``payload``. ``ref`` is a
  pickled ``(module, qualname, file, version)`` naming the function (empty when the callable
  travels inside the payload instead); ``version`` changes when the parent loads the module
  again. ``payload`` pickles ``(args, kwargs)``, or ``(callable, args, kwargs)`` when ``ref``
  is empty.
* worker -> parent: one kind byte + a pickle: ``READY`` ``pid`` once at start; ``OK``
  ``result``; ``ERROR`` ``(exception pickle or None, "Type: message", traceback text)``;
  ``MEMORY`` ``("Type: message", traceback text)`` when an allocation failed at the run's
  ``max_memory`` (the worker is then replaced); ``TOO_BIG`` ``why`` when the result's
  JSON text was over ``max_json`` or its pickle over ``max_pickle``; ``MEASURED``
  ``(result, *encoding.Encoded)`` (a plain 5-tuple) instead of ``OK`` when ``max_json`` is
  set: the result and its stored form, measured here (see :func:`taskd.run.limits.encode`),
  so the daemon never builds a result's text itself. Error texts are cut to ``limits.MAX_REMOTE_TEXT``
  characters, and built within bounds (``limits.describe``).

An empty frame, or end of file, from the parent means "exit now, cleanly". (The explicit frame
matters with the "fork" start method, where sibling workers inherit copies of each other's
sockets and end of file may never arrive.)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
import resource
import signal
import socket
import struct
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from taskd.run import proctree
from taskd.run.replies import ERROR as ERROR
from taskd.run.replies import MEASURED as MEASURED
from taskd.run.replies import MEMORY as MEMORY
from taskd.run.replies import OK as OK
from taskd.run.replies import READY as READY
from taskd.run.replies import TOO_BIG as TOO_BIG
from taskd.run.replies import error_reply, memory_reply, reply_for

HEADER = struct.Struct(">Q")
# A request's fixed part: max_memory, max_pickle, max_json, the length of the function's
# reference.
REQUEST = struct.Struct(">QQQI")


_PR_SET_PDEATHSIG = 1
# The signals the daemon acts on (stop, reload); neither a worker nor the forkserver dies of
# them (see _shield_from_daemon_signals and pool.forkserver.shield_helpers).
DAEMON_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM})
_RECV_CHUNK = 1 << 16
# How long the worker waits for the processes a run left behind to die once SIGKILLed (one
# stuck in the kernel, on a dead NFS mount say, is left for the next run's clean-up).
_REAP_TIMEOUT = 2.0

# ref pickles -> resolved callables; a worker serves many runs of few functions, so the
# second run of a function costs one dict lookup.
_resolved: dict[bytes, Callable[..., Any]] = {}
# Modules this worker loaded by path -> the parent's version of each when it was loaded.
_loaded_by_path: dict[str, object] = {}
# This worker's pid, set at start: a forked child of a job's has another.
_worker_pid = 0


def main(sock: socket.socket) -> None:
    """Entry point of a worker process: serve runs from ``sock`` until the parent closes it."""
    _shield_from_daemon_signals()
    _die_with_parent()
    # Every process a run starts stays a descendant of this worker, even one that left the
    # worker's process group and session (setsid) or whose parent exited: so the daemon can
    # find and kill them with the worker (a timeout, a memory limit) and the worker can kill
    # what a finished run left behind (see _end_leftovers).
    proctree.become_subreaper()
    channel = _Channel(sock)
    try:
        channel.send(bytes((READY,)) + pickle.dumps(os.getpid()))
        while True:
            frame = channel.recv()
            if not frame:
                break
            reply = execute(frame)
            _end_leftovers()
            # Drop the request before blocking for the next one: big arguments must not
            # count against the worker's memory while it sits idle.
            del frame
            channel.send(reply)
            del reply
            _flush_std_streams()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent went away; nobody is left to report to
    finally:
        sock.close()


def execute(frame: bytes | bytearray) -> bytes:
    """Run the call described by one request frame body; return the reply body.

    Never raises: whatever the job does (``SystemExit`` and ``KeyboardInterrupt`` included)
    becomes that run's reply, so one bad run cannot take the worker down with it.
    """
    max_memory, max_pickle, max_json, ref_len = REQUEST.unpack_from(frame)
    previous = _limit_memory(max_memory)
    summary: str | None = None
    error: BaseException | None
    try:
        try:
            view = memoryview(frame)
            start = REQUEST.size
            if ref_len:
                func = _resolve(bytes(view[start : start + ref_len]))
                args, kwargs = pickle.loads(view[start + ref_len :])
            else:
                func, args, kwargs = pickle.loads(view[start:])
            result = func(*args, **kwargs)
        except BaseException as exc:
            error = exc
        else:
            # Measured here, so a result too big for the daemon never crosses the pipe, nor
            # is unpickled or turned into text there.
            kind, error, summary, body = reply_for(result, max_pickle, max_json)
            del result
            if body is not None:
                return bytes((kind,)) + body
    finally:
        # Before the error reply is built: formatting a traceback needs memory too.
        _restore_memory(previous)
    if error is None:  # the result was too big: nothing was raised
        return bytes((TOO_BIG,)) + pickle.dumps(summary)
    if max_memory and isinstance(error, MemoryError):
        return memory_reply(error)
    return error_reply(error, summary=summary, send_exception=summary is None)


def _limit_memory(limit: int) -> int | None:
    """Cap this process's data segment (RLIMIT_DATA) at ``limit`` bytes for one run; return
    the soft limit to restore, or None if nothing was changed.

    RLIMIT_DATA counts private writable memory (the heap, the anonymous maps Python's
    allocator uses for arenas and big objects), not shared libraries or mapped files, so it
    is the kernel's closest match to the RSS that ``max_memory`` means; RLIMIT_AS counts
    address space too and fails runs well below the limit. Only the soft limit is lowered:
    a process without privileges can raise it again up to the hard limit after the run,
    while a lowered hard limit would bind this worker's later runs for ever.
    """
    if not limit:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    except (OSError, ValueError):
        return None  # the daemon's RSS watch still applies
    return soft


def _restore_memory(soft: int | None) -> None:
    if soft is None:
        return
    with contextlib.suppress(OSError, ValueError):
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _end_leftovers() -> None:
    """Kill and reap every process the run left behind, before its end is reported.

    The rule is systemd's ``KillMode=control-group`` applied to one run: the processes a run
    starts belong to it and end with it, however they detached themselves. A run that wants
    its children's output waits for them; something meant to outlive a run belongs in a
    service of its own. Orphans that already exited are reaped here too: as a subreaper the
    worker inherits them as zombies, which would otherwise pile up over its many runs.
    """
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return  # no child at all, so (as a subreaper) no descendant: the common case
    proctree.kill_tree(os.getpid(), include_root=False)
    proctree.reap_children(_REAP_TIMEOUT)


def _resolve(ref: bytes) -> Callable[..., Any]:
    func = _resolved.get(ref)
    if func is None:
        module_name, qualname, path, version = pickle.loads(ref)
        obj: Any = import_module(module_name, path, version)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        func = _resolved[ref] = obj
    return func


def import_module(name: str, path: str | None, version: object = None) -> Any:
    """Import ``name``; if no such module is importable by name, load it from ``path``.

    Drop-in plugin files are loaded by path under synthetic names that no finder knows, so
    the worker repeats what the parent's loader did and registers the module the same way
    (which also lets classes from it unpickle later). A module loaded by path is loaded again
    when the parent's ``version`` of it changes: the daemon reloads drop-ins on SIGHUP, and a
    long-lived worker must not keep running the old code.
    """
    if name in _loaded_by_path:
        module = sys.modules.get(name)
        if module is not None and _loaded_by_path[name] == version:
            return module
    else:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only "this very module is missing" falls through; a missing dependency of an
            # importable module is a real error to report as is.
            if path is None or exc.name is None or not (name + ".").startswith(exc.name + "."):
                raise
    if path is None:
        raise ImportError(f"module {name!r} was loaded by path but no path was sent", name=name)
    from taskd.plugin.dropin import exec_file

    try:
        module = exec_file(name, path)
    except BaseException:
        _loaded_by_path.pop(name, None)
        raise
    _loaded_by_path[name] = version
    return module


def _shield_from_daemon_signals() -> None:
    # A process group of its own: Ctrl-C, a terminal hang-up and `kill -- -PGID` reach the
    # daemon's group, not this one, and the pool can kill a run together with everything it
    # started by killing this group.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    # The daemon's signals can still come straight here (`systemctl kill` signals every
    # process of the service; an operator aiming at the wrong pid): they must not cost the
    # run, since whether runs stop is the daemon's decision, taken through the pool (with
    # SIGKILL, which nothing can catch). Caught, not ignored: exec resets a caught signal to
    # its default, so the commands a job runs do not inherit an ignored SIGTERM.
    global _worker_pid
    _worker_pid = os.getpid()
    for sig in DAEMON_SIGNALS:
        signal.signal(sig, _on_daemon_signal)
    # Blocked in the forkserver (see pool.forkserver.shield_helpers) and inherited through
    # fork; a blocked mask would also survive exec into a job's commands.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)
    # multiprocessing marks pool workers daemonic, which forbids a job from starting its
    # own child processes; the pool reaps its workers itself.
    try:
        import multiprocessing

        multiprocessing.current_process().daemon = False
    except Exception:
        pass


def _on_daemon_signal(signum: int, frame: FrameType | None) -> None:
    if os.getpid() == _worker_pid:
        return
    # A process the job forked without exec (a multiprocessing "fork" child, say) inherits
    # this handler: there the signal does what it would by default, so a job can still
    # stop its own children with SIGTERM.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _die_with_parent() -> None:
    # A worker busy in a long computation never reads its socket, so it would not notice a
    # kill -9'd daemon; the kernel kills it instead when its parent goes away (the daemon
    # itself, or the forkserver, which exits when the daemon does).
    _release_forkserver_lifeline()
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass  # best effort: an idle worker still exits on end of file from the parent


def _release_forkserver_lifeline() -> None:
    # multiprocessing hands every forkserver child the write end of the pipe whose end of
    # file tells the forkserver that the daemon is gone. A busy worker holding it would keep
    # the forkserver alive after a kill -9 of the daemon, and so never get its parent-death
    # signal. (A job that wants a forkserver of its own starts a new one anyway.)
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if server is not None and isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


class _Channel:
    """Blocking framed I/O on the worker's end of the socket pair."""

    __slots__ = ("_buf", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._buf = bytearray()

    def recv(self) -> bytes | bytearray | None:
        """Return the next frame's body, or None at end of file."""
        buf = self._buf
        while len(buf) < HEADER.size:
            chunk = self._sock.recv(_RECV_CHUNK)
            if not chunk:
                return None
            buf += chunk
        (size,) = HEADER.unpack_from(buf)
        end = HEADER.size + size
        if len(buf) >= end:
            body = bytes(buf[HEADER.size : end])
            del buf[:end]
            return body
        # A big frame: read its remainder straight into place instead of growing the buffer.
        body_buf = bytearray(size)
        have = len(buf) - HEADER.size
        body_buf[:have] = buf[HEADER.size :]
        buf.clear()
        view = memoryview(body_buf)
        while have < size:
            n = self._sock.recv_into(view[have:])
            if not n:
                return None
            have += n
        view.release()
        return body_buf

    def send(self, body: bytes) -> None:
        header = HEADER.pack(len(body))
        if len(body) <= _RECV_CHUNK:
            self._sock.sendall(header + body)
        else:
            self._sock.sendall(header)
            self._sock.sendall(body)
