"""Signals meant for the daemon do not cost a cpu run: a SIGTERM or SIGHUP to the daemon's
process group (what ``systemctl kill`` and a shell's job control send), or a SIGTERM to the
pool's forkserver, leave the run in flight to finish and later runs to start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil

from tests.helpers import DaemonProc, daemon_table, poll, run_cli

CPU = """
import os
import pathlib
import time

import taskd


def work(seconds: float = 0.0, pidfile: str = "", mode: str = "ok"):
    if pidfile:
        tmp = pidfile + ".tmp"
        pathlib.Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, pidfile)
    if seconds:
        time.sleep(seconds)
    if mode == "exit":
        os._exit(1)
    return {"pid": os.getpid()}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("work", work, kind="cpu")]
"""


def slow_job(pidfile: Path) -> str:
    """A cpu run of about 1.5 s at start that writes its worker's pid first."""
    return f"""
    [jobs.slow]
    type = "work"
    on = "startup"
    [jobs.slow.options]
    seconds = 1.5
    pidfile = "{pidfile}"
    """


# Driven by hand (`taskd trigger`): their schedule is far away.
BY_HAND = """
[jobs.crash]
type = "work"
every = "1h"
[jobs.crash.options]
mode = "exit"

[jobs.later]
type = "work"
every = "1h"
"""


def in_flight(d: DaemonProc, pidfile: Path) -> int:
    """The pid of the worker running ``slow``, once the run has started."""
    poll(pidfile.exists, timeout=10)
    pid = int(pidfile.read_text())
    assert d.events("run", job="slow") == [], "the run ended before the test could signal"
    return pid


def trigger(d: DaemonProc, job: str) -> subprocess.CompletedProcess[str]:
    return run_cli("trigger", job, "--wait", "-c", str(d.config_path), timeout=30)


class TestGroupSignals:
    """A signal to the daemon's whole process group reaches the daemon, not the pool."""

    def test_sigterm_drains_the_run_in_flight(self, daemon_factory, tmp_path: Path) -> None:
        pidfile = tmp_path / "worker.pid"
        d = daemon_factory(slow_job(pidfile), {"cpu.py": CPU}).start()
        in_flight(d, pidfile)
        os.killpg(d.pid, signal.SIGTERM)
        stopping = d.wait_for("stopping", signal="SIGTERM", timeout=5)[0]
        run = d.wait_for("run", job="slow", timeout=10)[0]
        assert run["outcome"] == "succeeded", run
        assert d.wait_exit() == 0
        # It finished in the drain, after the stop began.
        assert d.events("draining", runs=1)
        assert d.lines.index(stopping) < d.lines.index(run)
        assert d.events("stopped", forced=False)
        assert d.events("procpool.worker_died") == []

    def test_sighup_reloads_and_the_run_succeeds(self, daemon_factory, tmp_path: Path) -> None:
        pidfile = tmp_path / "worker.pid"
        d = daemon_factory(slow_job(pidfile) + BY_HAND, {"cpu.py": CPU}).start()
        in_flight(d, pidfile)
        os.killpg(d.pid, signal.SIGHUP)
        d.wait_for("reloaded", timeout=5)
        run = d.wait_for("run", job="slow", timeout=10)[0]
        assert run["outcome"] == "succeeded", run
        assert d.events("procpool.worker_died") == []
        # A worker that dies now is replaced through the same helpers the SIGHUP reached.
        assert trigger(d, "crash").returncode == 1
        result = trigger(d, "later")
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop() == 0
        # multiprocessing's resource tracker, killed by the SIGHUP, would be relaunched with
        # this warning at the next worker start.
        assert not any("resource_tracker" in line for line in d.raw), d.raw[-20:]


class TestForkserver:
    """The forkserver that forks the workers survives a SIGTERM, or is replaced."""

    def test_sigterm_to_the_forkserver(self, daemon_factory, tmp_path: Path) -> None:
        pidfile = tmp_path / "worker.pid"
        config = daemon_table(process_workers="1") + slow_job(pidfile) + BY_HAND
        d = daemon_factory(config, {"cpu.py": CPU}).start()
        worker = in_flight(d, pidfile)
        forkserver = psutil.Process(worker).ppid()
        assert forkserver != d.pid
        assert forkserver in {p.pid for p in psutil.Process(d.pid).children()}
        os.kill(forkserver, signal.SIGTERM)
        run = d.wait_for("run", job="slow", timeout=10)[0]
        assert run["outcome"] == "succeeded", run
        # The only worker exits; its replacement must come from a working forkserver.
        assert trigger(d, "crash").returncode == 1
        result = trigger(d, "later")
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert d.stop() == 0


class TestDegradedPool:
    """A crash-looping cpu job makes the pool degraded, and status says so."""

    def test_status_shows_a_degraded_pool(self, daemon_factory) -> None:
        config = daemon_table(process_workers="1") + (
            '[jobs.crash]\ntype = "work"\nevery = "200ms"\n[jobs.crash.options]\nmode = "exit"\n'
        )
        d = daemon_factory(config, {"cpu.py": CPU}).start()
        d.wait_for("procpool.degraded", timeout=15)
        result = run_cli("status", "--json", "-c", str(d.config_path))
        assert result.returncode == 0, result.stderr
        degraded = json.loads(result.stdout)["daemon"]["pool_degraded"]
        assert "keep failing" in degraded and "in a row" in degraded, degraded
        text = run_cli("status", "-c", str(d.config_path)).stdout
        assert "pool:   DEGRADED" in text, text
