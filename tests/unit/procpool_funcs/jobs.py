"""Job functions the process-pool tests submit.

They live in their own module, importable by name in the workers, and import only the standard
library so a fresh worker runs its first job without importing pytest.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def add(a: int, b: int) -> int:
    return a + b


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def getpid() -> int:
    return os.getpid()


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def report_pid_and_sleep(path: str, seconds: float) -> int:
    """Write this worker's pid to ``path`` (atomically), then sleep."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(seconds)
    return os.getpid()


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_system_exit(code: int) -> None:
    raise SystemExit(code)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


class UnpicklableError(Exception):
    """Holds a lock, so pickling it fails in the worker."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(message: str) -> None:
    raise UnpicklableError(message)


class TwoArgError(Exception):
    """Pickles fine but cannot be rebuilt: its args do not match its __init__."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a} and {b}")


def raise_two_arg() -> None:
    raise TwoArgError(1, 2)


def raise_stop_iteration() -> None:
    raise StopIteration("done")


def return_unpicklable() -> threading.Lock:
    return threading.Lock()


def exit_now(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def allocate_and_sleep(nbytes: int, seconds: float) -> int:
    data = b"x" * nbytes  # written, not just reserved: it counts in RSS
    time.sleep(seconds)
    return len(data)


def make_bytes(n: int) -> bytes:
    return b"\xab" * n


def length(data: bytes) -> int:
    return len(data)


def broken_marker() -> Path:
    """While this file exists, :func:`flaky_worker_main` workers die at start-up."""
    parent = multiprocessing.parent_process()
    owner = parent.pid if parent is not None else os.getpid()
    return Path(tempfile.gettempdir()) / f"taskd-test-procpool-broken-{owner}"


def flaky_worker_main(sock: socket.socket) -> None:
    """A worker entry point that fails at start-up while :func:`broken_marker` exists."""
    if broken_marker().exists():
        os._exit(7)
    from taskd.run import worker

    worker.main(sock)


def broken_worker_main(sock: socket.socket) -> None:
    """A worker entry point that always dies before reporting ready."""
    os._exit(7)


def spawn_child_and_sleep(path: str, seconds: float) -> None:
    """Start a grandchild (a job's own subprocess), note its pid and its ignored signals."""
    import subprocess

    child = subprocess.Popen(["sleep", "1000"])
    with open(f"/proc/{child.pid}/status") as fh:
        ignored = next(line.split()[1] for line in fh if line.startswith("SigIgn:"))
    Path(path).write_text(f"{child.pid} {ignored}")
    time.sleep(seconds)


def map_shared_and_sleep(nbytes: int, seconds: float) -> int:
    """Fill a shared anonymous map: resident memory that RLIMIT_DATA does not count."""
    import mmap

    area = mmap.mmap(-1, nbytes)
    for pos in range(0, nbytes, 1 << 20):
        area[pos : pos + (1 << 20)] = b"x" * (1 << 20)
    time.sleep(seconds)
    return nbytes


def data_limit() -> tuple[int, int]:
    import resource

    return resource.getrlimit(resource.RLIMIT_DATA)


def shared_rows(k: int, width: int) -> list[list[str]]:
    """A few KB of pickle, about k * k * (width + 4) bytes of JSON."""
    row = ["x" * width] * k
    return [row] * k


def raise_shared_rows(k: int, width: int) -> None:
    raise ValueError(shared_rows(k, width))


def floats(n: int) -> list[float]:
    return [0.0] * n  # 5 bytes an item as JSON, 9 as pickle
