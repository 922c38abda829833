"""Signals from the first millisecond: `taskd run` never dies of a SIGHUP or SIGTERM once the
interpreter runs its code, and a stop signal during a slow plugin import ends the start at
once instead of after the import.

The interpreter's own start-up (15-30 ms after exec here, more on a loaded machine) runs with
the default actions, and no Python program can change that. So the early-signal tests time
their signals from the end of it: ``taskd run`` is launched through a one-line ``-c`` program
that writes a byte to a pipe as its first statement, then runs ``taskd`` as ``python -m``
does. From that byte, the handlers are in place once `taskd` and `taskd.cli` are imported
(a few ms, light by design); before the fix they came only after every import, 125-340 ms
later. Every delay below falls in that old window."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProc, poll

# Milliseconds after the interpreter's start-up. The handlers are in place 3-12 ms after it
# (importing `taskd` and `taskd.cli`; median 5 ms), so the first leaves room for a busy
# machine; the last is still well before the old handlers (125 ms at the earliest).
DELAYS_MS = (30, 50, 75, 100)

LAUNCH = """\
import os, runpy
fd = int(os.environ.pop("TASKD_TEST_STARTED_FD"))
os.write(fd, b".")
os.close(fd)
runpy.run_module("taskd", run_name="__main__", alter_sys=True)
"""

QUICK = """
import taskd


async def quick(ctx) -> dict:
    return {}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("quick", quick)]
"""

SLOW_IMPORT = """
import pathlib
import time

import taskd

pathlib.Path({marker!r}).write_text("importing")
time.sleep(3)


async def quick(ctx) -> dict:
    return {{}}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("quick", quick)]
"""

JOB = '[jobs.q]\ntype = "quick"\nevery = "200ms"\n'


class Launched(DaemonProc):
    """A ``taskd run`` whose start() returns as the interpreter's start-up ends (see the
    module docstring), so a test can time its signals from there."""

    def start(self, *, wait: bool = False, timeout: float = 15.0) -> Launched:
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, "run", "--config", str(self.config_path)],
                cwd=self.dir,
                env={**self.env, "TASKD_TEST_STARTED_FD": str(w)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
                pass_fds=(w,),
            )
        finally:
            os.close(w)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            ready, _, _ = select.select([r], [], [], timeout)
            assert ready and os.read(r, 1) == b".", "the interpreter did not start"
        finally:
            os.close(r)
        if wait:
            self.wait_for("started", timeout=timeout)
        return self


class NotifyListener:
    """A stand-in for systemd's notify socket: what the daemon sent, as KEY=VALUE lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def received(self) -> list[str]:
        while True:
            try:
                self.lines += self.sock.recv(65536).decode().splitlines()
            except BlockingIOError:
                return self.lines


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify")
    yield listener
    listener.sock.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """``launch(config, plugins)`` -> a started Launched; killed at the end of the test."""
    made: list[Launched] = []

    def create(
        config: str, plugins: dict[str, str] | None = None, env: dict[str, str] | None = None
    ) -> Launched:
        d = Launched(tmp_path / f"d{len(made)}", config, plugins or {}, None)
        d.env.update(env or {})  # after DaemonProc, which drops an inherited NOTIFY_SOCKET
        made.append(d)
        return d.start()

    yield create
    for d in made:
        d.kill()


def sleep_ms(ms: int) -> None:
    time.sleep(ms / 1000)


class TestSignalsRightAfterExec:
    """Past the interpreter's start-up, a signal is never fatal."""

    @pytest.mark.parametrize("delay", DELAYS_MS)
    def test_sigterm_stops_cleanly(self, launch, delay: int) -> None:
        d = launch(JOB, {"quick.py": QUICK})
        sleep_ms(delay)
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=15) == 0  # -15 would mean it died of the signal
        # Acted on: a stop during the start, or a drain-and-stop right after it.
        assert d.events("stopped_during_start") or d.events("stopped")

    @pytest.mark.parametrize("delay", DELAYS_MS)
    def test_sighup_is_kept_and_the_daemon_runs(self, launch, notify, delay: int) -> None:
        d = launch(JOB, {"quick.py": QUICK}, env={"NOTIFY_SOCKET": str(notify.path)})
        sleep_ms(delay)
        d.signal(signal.SIGHUP)
        d.wait_for("started", timeout=15)
        assert "READY=1" in notify.received()
        d.wait_for("reloaded", timeout=5)  # the early SIGHUP, acted on once started
        d.wait_for("run", job="q", outcome="succeeded", count=2, timeout=5)
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop() == 0


class TestStopDuringSlowImport:
    """A stop signal while a plugin imports (for 3 s) ends the start without waiting."""

    def _importing(
        self, daemon_factory, tmp_path: Path, notify: NotifyListener | None = None
    ) -> DaemonProc:
        marker = tmp_path / "importing"
        d = daemon_factory(JOB, {"slow_import.py": SLOW_IMPORT.format(marker=str(marker))})
        if notify is not None:
            d.env["NOTIFY_SOCKET"] = str(notify.path)
        d.start(wait=False)
        poll(marker.exists, timeout=10, interval=0.01)
        return d

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
    def test_stop_signal_ends_the_start(self, daemon_factory, tmp_path, notify, sig) -> None:
        d = self._importing(daemon_factory, tmp_path, notify)
        t0 = time.monotonic()
        d.signal(sig)
        assert d.wait_exit(timeout=10) == 0
        assert time.monotonic() - t0 < 1.0  # the import has 3 s to go
        assert d.events("stopped_during_start", signal=sig.name)
        assert d.events("started") == []
        assert "READY=1" not in notify.received()

    def test_sighup_first_does_not_hold_the_stop(self, daemon_factory, tmp_path) -> None:
        d = self._importing(daemon_factory, tmp_path)
        t0 = time.monotonic()
        d.signal(signal.SIGHUP)
        time.sleep(0.1)
        assert d.proc is not None and d.proc.poll() is None  # a SIGHUP alone stops nothing
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=10) == 0
        assert time.monotonic() - t0 < 1.0
        assert d.events("stopped_during_start", signal="SIGTERM")
        assert d.events("started") == [] and d.events("reloaded") == []


class TestLightImport:
    """`taskd` and `taskd.cli` import nothing heavy; the public API still resolves."""

    def test_public_names_load_on_first_use(self) -> None:
        probe = (
            "import sys\n"
            "import taskd.cli\n"
            "heavy = [m for m in ('pluggy', 'structlog', 'asyncio', 'taskd.errors') if m in sys.modules]\n"
            "assert heavy == [], heavy\n"
            "import taskd\n"
            "from taskd import JobContext, JobType, hookimpl\n"
            "from taskd.plugin.hookspecs import hookimpl as real\n"
            "assert taskd.hookimpl is hookimpl is real\n"
            "assert {'JobType', 'JobContext', 'ConfigError'} <= set(dir(taskd))\n"
            "try:\n"
            "    taskd.no_such_name\n"
            "except AttributeError:\n"
            "    pass\n"
            "else:\n"
            "    raise AssertionError('no AttributeError')\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr

    def test_the_config_parse_starts_before_the_validation_is_imported(
        self, tmp_path: Path
    ) -> None:
        # taskd run starts the parser's process right after the arguments are parsed; what it
        # needs until then must not pull in the validation, the CLI's shared helpers or
        # asyncio (about 50 ms that would delay the parse, and READY with it).
        config = tmp_path / "taskd.toml"
        config.write_text("[daemon]\n")
        probe = (
            "import sys\n"
            "import taskd.cli\n"
            "args = taskd.cli.build_parser().parse_args(['run', '-c', sys.argv[1]])\n"
            "from taskd.config.source import Parse, config_file, start_parse\n"
            "parse = start_parse(config_file(args.config))\n"
            "assert isinstance(parse, Parse), parse\n"
            "heavy = [m for m in ('taskd.config.load', 'taskd.cli.common', 'taskd.cli.history',"
            " 'asyncio', 'taskd.config.model') if m in sys.modules]\n"
            "assert heavy == [], heavy\n"
            "doc, lines = parse.document()\n"
            "assert doc == {'daemon': {}}, doc\n"
            "from taskd.config import DEFAULT_CONFIG, load_config\n"
            "assert 'taskd.config.load' in sys.modules\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe, str(config)], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
