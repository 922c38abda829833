"""Issue 8, items 5-7, black-box: a plugin that raises SystemExit (in a hook, or in a task it
started) is that plugin's failure; a stdout that breaks (reader gone, full disk, closed) never
crashes or hangs the daemon; a job's os.chdir does not break later reloads."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProc, poll

OK = """
import taskd


async def ok(ctx) -> int:
    return 1


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("ok", ok)]
"""

EVERY = '[jobs.tick]\ntype = "ok"\nevery = "150ms"\n'

ASYNC_HOOK_EXITS = """
import taskd


@taskd.hookimpl
async def taskd_job_event(event):
    if event.kind == "succeeded":
        raise {exc}
"""

TASK_IN_HOOK_EXITS = """
import asyncio

import taskd


async def give_up():
    await asyncio.sleep(0)
    raise SystemExit(9)


@taskd.hookimpl
def taskd_job_event(event):
    if event.kind == "succeeded":
        asyncio.get_running_loop().create_task(give_up(), name="notifier-give-up")
"""

TASK_IN_JOB_EXITS = """
import asyncio

import taskd


async def give_up():
    await asyncio.sleep(0)
    raise SystemExit(4)


async def spawner(ctx) -> str:
    asyncio.get_running_loop().create_task(give_up(), name="job-side-task")
    return "spawned"


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("spawner", spawner)]
"""


def runs_after(d: DaemonProc, job: str, more: int, timeout: float = 5.0) -> None:
    """Wait for ``more`` successful runs of ``job`` beyond those logged so far."""
    have = len(d.events("run", job=job, outcome="succeeded"))
    d.wait_for("run", job=job, outcome="succeeded", count=have + more, timeout=timeout)


def stopped_cleanly(d: DaemonProc) -> None:
    assert d.stop(timeout=15) == 0
    assert d.events("stopped"), d.raw[-20:]


class TestPluginSystemExit:
    """SystemExit or KeyboardInterrupt from a plugin, wherever it runs, is that plugin's
    failure: logged with the plugin, and the daemon goes on and stops as usual."""

    @pytest.mark.parametrize(
        ("exc", "error"),
        [
            ("SystemExit(9)", "SystemExit: 9"),
            ("KeyboardInterrupt('bye')", "KeyboardInterrupt: bye"),
        ],
    )
    def test_async_event_hook(self, daemon_factory, exc: str, error: str) -> None:
        d = daemon_factory(EVERY, {"ok.py": OK, "hook.py": ASYNC_HOOK_EXITS.format(exc=exc)})
        d.start()
        failed = d.wait_for("hook_failed", hook="taskd_job_event", count=2, timeout=5)
        assert all(f["error"] == error and f["plugin"].endswith("hook.py") for f in failed)
        runs_after(d, "tick", 3)
        stopped_cleanly(d)

    def test_task_started_in_a_hook(self, daemon_factory) -> None:
        d = daemon_factory(EVERY, {"ok.py": OK, "hook.py": TASK_IN_HOOK_EXITS}).start()
        raised = d.wait_for("plugin_task_raised", count=2, timeout=5)
        for line in raised:
            assert line["error"] == "SystemExit: 9"
            assert line["plugin"].endswith("hook.py"), line
            assert line["task"] == "notifier-give-up"
            assert line["coro"].startswith("give_up ("), line
        runs_after(d, "tick", 3)
        # asyncio's own "exception was never retrieved" is replaced by the line above.
        assert not [r for r in d.raw if "never retrieved" in r]
        stopped_cleanly(d)

    def test_task_started_in_an_io_job(self, daemon_factory) -> None:
        config = '[jobs.spawn]\ntype = "spawner"\nevery = "150ms"\n'
        d = daemon_factory(config, {"job.py": TASK_IN_JOB_EXITS}).start()
        raised = d.wait_for("plugin_task_raised", count=2, timeout=5)
        assert {r["task"] for r in raised} == {"job-side-task"}
        assert all(r["plugin"].endswith("job.py") for r in raised), raised
        runs_after(d, "spawn", 3)
        # The next run (every 150 ms) may have begun by now: in flight is not a failure.
        runs = [r for r in d.history("spawn") if r["outcome"] != "running"]
        assert all(r["outcome"] == "succeeded" for r in runs), runs
        stopped_cleanly(d)

    def test_real_sigint_still_stops_the_daemon(self, daemon_factory) -> None:
        # Ctrl-C is the daemon's loop handler's, never a plugin failure that the daemon
        # shrugs off.
        d = daemon_factory(EVERY, {"ok.py": OK, "hook.py": TASK_IN_HOOK_EXITS}).start()
        d.wait_for("plugin_task_raised", timeout=5)
        d.signal(signal.SIGINT)
        assert d.wait_exit(timeout=15) == 0
        assert d.events("stopping", signal="SIGINT")
        assert d.events("stopped")


# -- output ---------------------------------------------------------------------------------


def popen(
    d: DaemonProc, *, env: dict[str, str] | None = None, shell: str = "", **streams: Any
) -> None:
    """Start ``taskd run`` on ``d``'s files with the given stdout/stderr (DaemonProc's own
    start reads stdout, which these tests take away); ``shell``: redirections, as typed."""
    argv = [sys.executable, "-m", "taskd", "run", "--config", str(d.config_path)]
    if shell:
        argv = ["sh", "-c", f'exec "$@" {shell}', "sh", *argv]
    d.proc = subprocess.Popen(  # type: ignore[assignment]
        argv,
        cwd=d.dir,
        env={**d.env, **(env or {})},
        start_new_session=True,
        **streams,
    )


def rows(d: DaemonProc) -> int:
    try:
        return len(d.history())
    except sqlite3.Error:  # not made yet: the daemon is starting
        return 0


def history_grows(d: DaemonProc, more: int = 5, timeout: float = 10.0) -> None:
    """Runs keep being recorded: ``more`` new history rows appear."""
    have = rows(d)
    poll(lambda: rows(d) >= have + more, timeout=timeout)


def stop_in_time(d: DaemonProc, limit: float = 5.0) -> int:
    assert d.proc is not None
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    code = d.proc.wait(timeout=limit + 10)
    took = time.monotonic() - started
    assert took < limit, f"the stop took {took:.1f}s"
    return code


# PYTHONUNBUFFERED, as the harness sets it; unset, as a plain unit or shell would run it.
BUFFERING = pytest.mark.parametrize(
    "buffering",
    [{"PYTHONUNBUFFERED": "1"}, {"PYTHONUNBUFFERED": ""}],
    ids=["unbuffered", "buffered"],
)


class TestBrokenStdout:
    """A log line that cannot be written is dropped; runs, history and the stop go on."""

    @BUFFERING
    def test_reader_of_the_pipe_goes_away(self, daemon_factory, buffering: dict[str, str]) -> None:
        d = daemon_factory(EVERY, {"ok.py": OK})
        popen(d, env=buffering, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert d.proc is not None and d.proc.stdout is not None
        deadline = time.monotonic() + 15
        for line in d.proc.stdout:  # up to `started`, then the reader leaves
            if b'"event": "started"' in line or time.monotonic() > deadline:
                break
        d.proc.stdout.close()
        history_grows(d)
        assert d.proc.poll() is None
        assert stop_in_time(d) == 0

    @BUFFERING
    def test_stdout_is_a_full_disk(
        self, daemon_factory, tmp_path: Path, buffering: dict[str, str]
    ) -> None:
        d = daemon_factory(EVERY, {"ok.py": OK})
        with open("/dev/full", "wb") as full, open(tmp_path / "stderr", "wb") as err:
            popen(d, env=buffering, stdout=full, stderr=err)
        history_grows(d)
        assert d.proc is not None and d.proc.poll() is None
        assert stop_in_time(d) == 0
        assert b"Traceback" not in (tmp_path / "stderr").read_bytes()

    def test_stdout_closed_at_exec(self, daemon_factory, tmp_path: Path) -> None:
        # `taskd run >&-`: Python starts with sys.stdout None, and fd 1 free for the next
        # file the daemon opens.
        d = daemon_factory(EVERY, {"ok.py": OK})
        with open(tmp_path / "stderr", "wb") as err:
            popen(d, stderr=err, shell=">&-")
        history_grows(d)
        assert d.proc is not None and d.proc.poll() is None
        assert stop_in_time(d) == 0
        assert b"Traceback" not in (tmp_path / "stderr").read_bytes()


# -- paths ----------------------------------------------------------------------------------

WANDER = """
import os

import taskd


async def wander(ctx) -> str:
    os.chdir("/")
    return os.getcwd()


async def ok(ctx) -> int:
    return 1


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("wander", wander), taskd.JobType("ok", ok)]
"""


class TestPaths:
    """Every path the daemon holds is resolved once, at start: a job's os.chdir changes
    nothing for it."""

    def test_reload_after_a_job_changed_directory(self, daemon_factory) -> None:
        # The harness's [daemon] paths (plugins.d, state, run) are relative, and so is the
        # --config given here: all of them are relative to the directory taskd started in.
        config = '[jobs.away]\ntype = "wander"\non = "startup"\n'
        d = daemon_factory(config, {"w.py": WANDER})
        absolute = d.config_path
        d.config_path = Path(absolute.name)  # started as `taskd run --config taskd.toml`
        d.start()
        d.wait_for("run", job="away", outcome="succeeded", timeout=5)
        d.config_path = absolute
        d.write_config(config + '\n[jobs.later]\ntype = "ok"\nevery = "150ms"\n')
        d.signal(signal.SIGHUP)
        reloaded = d.wait_for("reloaded", timeout=10)
        assert reloaded[0]["added"] == ["later"], reloaded
        assert not d.events("reload_failed")
        d.wait_for("run", job="later", outcome="succeeded", count=2, timeout=5)
        stopped_cleanly(d)
