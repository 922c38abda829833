"""Finding and killing every descendant of a process, including those that left its process
group or session (``setsid()``) and those orphaned to it as a child subreaper.

Standard library only: the pool's workers import it (see :mod:`taskd.run.worker`), and they
start from a forkserver that keeps its imports small. Linux only (``/proc``); elsewhere it
finds no descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

__all__ = ["become_subreaper", "descendants", "kill_tree", "reap_children"]

_PR_SET_CHILD_SUBREAPER = 36
# A tree that keeps growing while it is being frozen (a fork bomb) is given this many scans;
# what it forked past them is left to the process group kill and, under systemd, the cgroup.
_MAX_ROUNDS = 100


def become_subreaper() -> bool:
    """Make this process a child subreaper: orphans among its descendants (a double fork, a
    ``setsid()`` daemon whose parent exited) are reparented to it instead of to init, so they
    stay findable as its descendants. Return whether it worked."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except Exception:
        return False


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process in /proc (one pass over /proc/*/stat)."""
    parents: dict[int, int] = {}
    try:
        entries = os.scandir("/proc")
    except OSError:
        return parents
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                parents[int(entry.name)] = int(stat[stat.rindex(b")") + 2 :].split(None, 2)[1])
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked, or not ours to read
    return parents


def descendants(root: int) -> set[int]:
    """The pids of every live or zombie descendant of ``root`` right now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_tree(root: int, *, include_root: bool) -> int:
    """SIGKILL every descendant of ``root`` (and ``root`` itself with ``include_root``);
    return how many descendants were signalled.

    A process that forks while its tree is being killed could slip out between the scan and
    the kill, so the tree is frozen first: each scan SIGSTOPs what it finds (a stopped
    process cannot fork) and the scans repeat until one finds nothing new, which also catches
    orphans reparented to ``root`` meanwhile. Then everything is SIGKILLed (which ends stopped
    processes too).
    """
    if include_root:
        _signal(root, signal.SIGSTOP)
        _wait_stopped({root})
    stopped: set[int] = set()
    for _ in range(_MAX_ROUNDS):
        found = descendants(root) - stopped
        if not found:
            break
        for pid in found:
            _signal(pid, signal.SIGSTOP)
        # SIGSTOP takes effect when the process next runs: one still inside fork() when the
        # scan ran adds a child after it. Only once all are really stopped can the next scan
        # find nothing new for good (under load, hundreds slipped out without this wait).
        _wait_stopped(found)
        stopped |= found
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    if include_root:
        _signal(root, signal.SIGKILL)
    return len(stopped)


def _wait_stopped(pids: set[int], timeout: float = 0.5) -> None:
    """Wait until each of ``pids`` is stopped, a zombie or gone (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    stat = fh.read()
                state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
            except (OSError, ValueError):
                state = b"X"
            if state in (b"T", b"t", b"Z", b"X"):
                waiting.discard(pid)
        if waiting:
            time.sleep(0.0005)


def reap_children(timeout: float) -> bool:
    """Reap every child of this process that has exited, waiting up to ``timeout`` seconds
    for those still dying; return True once no child is left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid:
            continue
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
