"""The single-instance lock: one daemon per state_dir."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from taskd.errors import AlreadyRunningError
from taskd.state import files


class InstanceLock:
    """An exclusive ``flock`` on ``state_dir/taskd.lock`` holding the owner's pid.

    flock is released by the kernel when the process dies, however it dies, so a stale lock
    file from a ``kill -9`` never blocks the next start."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "taskd.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        # The first thing the daemon does with state_dir: an untrusted one stops it here.
        # From here on through its resolved path, whose every folder is trusted.
        self.path = files.prepare_dir(self.path.parent) / self.path.name
        fd = files.open_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise AlreadyRunningError(
                f"another taskd (pid {owner}) is already running on state_dir {self.path.parent}; "
                f"stop it first, or give this one a different state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
