"""Test helpers. ``DaemonProc`` runs ``taskd run`` as a real process on a config and
plugin files written by the test, reads its JSON log lines, and cleans up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


DAEMON_DEFAULTS: dict[str, str] = {
    "plugin_dirs": '["plugins.d"]',
    "state_dir": '"state"',
    "runtime_dir": '"run"',
    "log_format": '"json"',
    "log_level": '"debug"',
    "shutdown_timeout": '"5s"',
    "process_workers": "2",
}


def daemon_table(**overrides: str) -> str:
    """The harness's [daemon] table (test paths, JSON logs); values are TOML literals."""
    values = {**DAEMON_DEFAULTS, **overrides}
    return "[daemon]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"


def poll(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Return check()'s first truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: last value {value!r}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A drop-in plugin with one io job type, "tick", that returns 1: for tests about what the
# daemon does around runs (state, history), not about the runs themselves.
TICK_PLUGIN = """
import taskd


async def tick(ctx) -> int:
    return 1


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("tick", tick)]
"""


def _status_bytes(pid: int, field: str) -> int | None:
    """A size field of /proc/PID/status (``VmRSS``, ``VmHWM``) in bytes; None when absent
    (a zombie's status has no memory lines)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes; 0 once it is gone or a zombie (for polling a
    process that may exit meanwhile)."""
    try:
        return _status_bytes(pid, "VmRSS") or 0
    except OSError:
        return 0


def peak_rss(pid: int) -> int:
    """Peak resident memory (VmHWM) of a live ``pid`` in bytes; raises if it is gone."""
    peak = _status_bytes(pid, "VmHWM")
    if peak is None:
        raise AssertionError(f"no VmHWM in /proc/{pid}/status: the process has exited")
    return peak


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _matches(line: dict[str, Any], event: str | None, fields: dict[str, Any]) -> bool:
    if event is not None and line.get("event") != event:
        return False
    return all(line.get(k) == v for k, v in fields.items())


class DaemonProc:
    """A ``taskd run`` process and what it logged."""

    def __init__(
        self, workdir: Path, config: str, plugins: dict[str, str], env: dict[str, str] | None
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "plugins.d").mkdir(exist_ok=True)
        self.config_path = self.dir / "taskd.toml"
        self.write_config(config)
        for name, source in plugins.items():
            self.write_plugin(name, source)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen[str] | None = None
        # A command ``taskd run`` runs under (``["faketime", "-f", "+20s"]``): set before start.
        self.wrap: list[str] = []
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    # -- files ---------------------------------------------------------------------------

    def write_config(self, text: str) -> None:
        """Write taskd.toml; a [daemon] table with test paths and JSON logs is prepended
        unless the text has its own."""
        text = textwrap.dedent(text)
        if "[daemon]" not in text:
            text = daemon_table() + text
        self.config_path.write_text(text)

    def write_plugin(self, name: str, source: str) -> Path:
        path = self.dir / "plugins.d" / name
        path.write_text(textwrap.dedent(source))
        return path

    # -- process ---------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float = 15.0) -> DaemonProc:
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "taskd", "run", "--config", str(self.config_path)],
            cwd=self.dir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # our own process group: a test's kill never reaches pytest
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_for("started", timeout=timeout)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            raw = raw.rstrip("\n")
            with self._cond:
                self.raw.append(raw)
                try:
                    obj = json.loads(raw)
                    if isinstance(obj, dict):
                        self.lines.append(obj)
                except ValueError:
                    pass
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def daemon_pid(self) -> int:
        """The taskd process itself: under a wrapper (``wrap``) that is not :attr:`pid`, so
        it is read from the ``started`` line."""
        if not self.wrap:
            return self.pid
        return int(self.wait_for("started")[0]["pid"])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def events(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.lines if _matches(line, event, fields)]

    def wait_for(
        self, event: str | None = None, *, timeout: float = 10.0, count: int = 1, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` log lines match; fail with the log so far if not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if _matches(line, event, fields)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                exited = (
                    self.proc is not None
                    and self.proc.poll() is not None
                    and not (self._reader and self._reader.is_alive())
                )
                if left <= 0 or exited:
                    tail = "\n".join(self.raw[-40:])
                    why = "exited" if exited else "timed out"
                    raise AssertionError(
                        f"{why} waiting for {count}x {event} {fields}; log tail:\n{tail}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._close_pipe()
        return code

    def _close_pipe(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
        if (
            self.proc is not None
            and self.proc.stdout is not None
            and not (self._reader and self._reader.is_alive())
        ):
            self.proc.stdout.close()

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_pipe()

    # -- state -----------------------------------------------------------------------------

    def db(self) -> sqlite3.Connection:
        """The state database, opened read-only, as another process would."""
        return sqlite3.connect(f"file:{self.dir / 'state' / 'state.db'}?mode=ro", uri=True)

    def history(self, job: str | None = None) -> list[dict[str, Any]]:
        # closing(): a sqlite3 connection's own `with` only commits; left open until the
        # garbage collector runs, it would hold the -wal/-shm under later readers.
        with contextlib.closing(self.db()) as db:
            db.row_factory = sqlite3.Row
            sql = "SELECT * FROM runs" + (" WHERE job = ?" if job else "") + " ORDER BY seq"
            return [dict(r) for r in db.execute(sql, (job,) if job else ())]


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m taskd ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "taskd", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
