"""Starting worker processes through multiprocessing's forkserver, and keeping it usable.

The forkserver (and the resource tracker) must keep out of the daemon's signals, and one that
died, however it died, must be replaced at the next start. Both rest on multiprocessing's
private state, read defensively here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

from taskd.run import worker as _wire

__all__ = [
    "MP_LOCK",
    "forget_dead_forkserver",
    "forkserver_pid",
    "process_gone",
    "shield_helpers",
    "start_process",
]

# ``Process.start()`` polls every other live child of this process (multiprocessing's
# ``_cleanup``), which for a forkserver child reads the exit status from its sentinel. Reading
# the same status on the loop thread at the same moment would lose it, so both hold this lock.
MP_LOCK = threading.Lock()


def shield_helpers(start_method: str) -> None:
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


def forkserver_pid() -> int:
    """The pid of the running forkserver, 0 if none was started."""
    pid = getattr(_forkserver_server(), "_forkserver_pid", None)
    return pid if isinstance(pid, int) else 0


def forget_dead_forkserver() -> int:
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


def start_process(proc: BaseProcess, start_method: str) -> tuple[int, int]:
    """Start ``proc``; return the pid of the forkserver that forked it (0 for none) and that
    of a dead one it replaced (0 if none)."""
    forkserver = start_method == "forkserver"
    with MP_LOCK:
        shield_helpers(start_method)
        dead = 0
        try:
            proc.start()
        except (OSError, EOFError):
            # A forkserver that died since the last start: refused connection, lost reply,
            # or reaped by someone else. Once more with a new one; any other failure stands.
            dead = forget_dead_forkserver() if forkserver else 0
            if not dead:
                raise
            shield_helpers(start_method)
            proc.start()
        return (forkserver_pid() if forkserver else 0), dead


def process_gone(pid: int) -> bool:
    """True if ``pid`` has exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
