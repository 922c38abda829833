"""Faults stay inside the run that caused them: exceptions of every kind, odd return values,
raising hooks, and cpu workers that die, hang or return what cannot be pickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import DaemonProc, poll

FT = """
import taskd


class Thing:
    def __repr__(self) -> str:
        return "<Thing 7>"


async def boom(ctx, what: str = "value"):
    if what == "value":
        raise ValueError("bad value")
    if what == "exit":
        raise SystemExit(3)
    if what == "interrupt":
        raise KeyboardInterrupt("interrupted by the job")
    if what == "thing":
        return Thing()
    return {"what": what}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("boom", boom)]
"""

BAD_HOOK = """
import taskd


@taskd.hookimpl
def taskd_job_event(event):
    raise RuntimeError("hook exploded")
"""

GOOD_HOOK = """
import taskd


@taskd.hookimpl
def taskd_job_event(event):
    with open({path!r}, "a") as f:
        f.write(f"{{event.kind}} {{event.job}}\\n")
"""

CPU = """
import ctypes
import os
import pathlib
import signal
import threading
import time

import taskd


def work(mode: str = "ok", seconds: float = 0.0, pidfile: str = ""):
    if pidfile:
        pathlib.Path(pidfile).write_text(str(os.getpid()))
    if seconds:
        time.sleep(seconds)
    if mode == "exit":
        os._exit(1)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "segv":
        ctypes.string_at(0)
    if mode == "lambda":
        return lambda: 1
    if mode == "lock":
        return threading.Lock()
    return {"pid": os.getpid(), "mode": mode}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("work", work, kind="cpu")]
"""


def shared(d: DaemonProc) -> dict[str, Any]:
    with d.db() as db:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM shared")}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class TestJobErrors:
    """Whatever an io job raises is that run's failure; the next tick runs as usual."""

    @pytest.mark.parametrize(
        ("what", "error"),
        [
            ("value", "ValueError: bad value"),
            ("exit", "SystemExit: 3"),
            ("interrupt", "KeyboardInterrupt: interrupted by the job"),
        ],
    )
    def test_exception_fails_only_the_run(self, daemon_factory, what: str, error: str) -> None:
        config = f'[jobs.b]\ntype = "boom"\nevery = "200ms"\n[jobs.b.options]\nwhat = "{what}"\n'
        d = daemon_factory(config, {"ft.py": FT}).start()
        runs = d.wait_for("run", job="b", count=2, timeout=3)
        assert all(r["outcome"] == "failed" and r["error"] == error for r in runs), runs
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop() == 0
        assert {r["error"] for r in d.history("b")} == {error}

    def test_unserialisable_result_is_stored_as_repr(self, daemon_factory) -> None:
        config = '[jobs.t]\ntype = "boom"\non = "startup"\n[jobs.t.options]\nwhat = "thing"\n'
        d = daemon_factory(config, {"ft.py": FT}).start()
        assert d.wait_for("run", job="t", timeout=3)[0]["outcome"] == "succeeded"
        assert poll(lambda: shared(d).get("t")) == "<Thing 7>"
        assert d.stop() == 0
        with d.db() as db:
            (last,) = db.execute("SELECT last_result FROM jobs WHERE name = 't'").fetchone()
        assert json.loads(last) == "<Thing 7>"


class TestHooks:
    """A raising hook is logged; the runs and the other plugins' hooks go on."""

    def test_raising_event_hook_does_not_stop_anything(self, daemon_factory, tmp_path) -> None:
        seen = tmp_path / "events.txt"
        d = daemon_factory(
            '[jobs.ok]\ntype = "boom"\nevery = "200ms"\n[jobs.ok.options]\nwhat = "fine"\n',
            {
                "ft.py": FT,
                "a_bad_hook.py": BAD_HOOK,
                "z_good_hook.py": GOOD_HOOK.format(path=str(seen)),
            },
        ).start()
        d.wait_for("run", job="ok", outcome="succeeded", count=3, timeout=3)
        failed = d.wait_for("hook_failed", hook="taskd_job_event", timeout=3)
        assert "a_bad_hook.py" in failed[0]["plugin"]
        assert "hook exploded" in failed[0]["error"]
        lines = poll(lambda: seen.exists() and seen.read_text().splitlines())
        assert "started ok" in lines and "succeeded ok" in lines
        assert d.stop() == 0


def cpu_daemon(daemon_factory, config: str) -> DaemonProc:
    return daemon_factory(config, {"cpu.py": CPU}).start()


class TestCpuJobs:
    """cpu jobs run in worker processes; a worker's death, hang or bad result costs one run."""

    def test_runs_in_a_worker_process(self, daemon_factory) -> None:
        d = cpu_daemon(daemon_factory, '[jobs.w]\ntype = "work"\nevery = "200ms"\n')
        d.wait_for("run", job="w", outcome="succeeded", count=2, timeout=5)
        result = poll(lambda: shared(d).get("w"))
        assert result["mode"] == "ok"
        assert result["pid"] != d.pid
        descendants = {p.pid for p in psutil.Process(d.pid).children(recursive=True)}
        assert result["pid"] in descendants

    @pytest.mark.parametrize(
        ("mode", "how"),
        [("exit", "exited with code 1"), ("kill", "SIGKILL"), ("segv", "SIGSEGV")],
    )
    def test_dead_worker_fails_only_its_run(self, daemon_factory, mode: str, how: str) -> None:
        d = cpu_daemon(
            daemon_factory,
            f"""
            [jobs.crash]
            type = "work"
            on = "startup"
            [jobs.crash.options]
            mode = "{mode}"
            seconds = 0.3

            [jobs.steady]
            type = "work"
            on = "startup"
            [jobs.steady.options]
            seconds = 0.8

            [jobs.sibling]
            type = "work"
            every = "300ms"
            """,
        )
        crash = d.wait_for("run", job="crash", timeout=5)[0]
        assert crash["outcome"] == "failed"
        assert "worker process" in crash["error"] and how in crash["error"], crash["error"]
        steady = d.wait_for("run", job="steady", timeout=5)[0]
        assert steady["outcome"] == "succeeded"
        (c,), (s,) = d.history("crash"), d.history("steady")
        assert s["started"] < c["started"] + c["duration"]  # they ran at the same time
        have = len(d.events("run", job="sibling", outcome="succeeded"))
        d.wait_for("run", job="sibling", outcome="succeeded", count=have + 2, timeout=5)
        assert d.events("run", job="sibling", outcome="failed") == []
        assert d.stop() == 0

    def test_timeout_kills_the_worker(self, daemon_factory, tmp_path: Path) -> None:
        pidfile = tmp_path / "worker.pid"
        d = cpu_daemon(
            daemon_factory,
            f"""
            [jobs.slow]
            type = "work"
            on = "startup"
            timeout = "500ms"
            [jobs.slow.options]
            seconds = 30.0
            pidfile = "{pidfile}"

            [jobs.sibling]
            type = "work"
            every = "300ms"
            """,
        )
        run = d.wait_for("run", job="slow", timeout=5)[0]
        assert run["outcome"] == "timed_out"
        assert run["duration"] < 0.5 + 1.0
        pid = int(pidfile.read_text())
        assert pid != d.pid
        poll(lambda: gone(pid), timeout=2)
        have = len(d.events("run", job="sibling", outcome="succeeded"))
        d.wait_for("run", job="sibling", outcome="succeeded", count=have + 2, timeout=5)

    @pytest.mark.parametrize("mode", ["lambda", "lock"])
    def test_unpicklable_result_fails_clearly(self, daemon_factory, mode: str) -> None:
        d = cpu_daemon(
            daemon_factory,
            f'[jobs.u]\ntype = "work"\nevery = "200ms"\n[jobs.u.options]\nmode = "{mode}"\n',
        )
        runs = d.wait_for("run", job="u", count=2, timeout=5)
        for run in runs:
            assert run["outcome"] == "failed"
            assert "could not be pickled" in run["error"], run["error"]
        assert d.stop() == 0
