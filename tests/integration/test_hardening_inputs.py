"""Bounded inputs (issue 8): odd files in a plugin folder (item 9), values read back from
state (item 12), and job names that would tear the tick journal (item 11), each injected into
a real ``taskd`` process."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from taskd.config.job_table import JOB_NAME
from tests.helpers import DaemonProc, daemon_table, rss

MAX_RSS = 200 * 1024 * 1024  # a daemon or `taskd check` above this is reading what it must not
PROMPT = 5.0  # seconds: "starts promptly"

ECHO = """
import taskd


async def echo(ctx) -> None:
    ctx.log.info("echo_ran")


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("echo", echo)]
"""

TICK = '[jobs.tick]\ntype = "echo"\nevery = "200ms"\n'


def run_bounded(args: list[str], cwd: Path, timeout: float = 15.0) -> tuple[int, str, float, int]:
    """Run ``python -m taskd ARGS``, killing it past ``timeout`` or MAX_RSS (so a regression
    fails this test instead of hanging it or exhausting the machine's memory). Returns the
    exit code, stdout + stderr, seconds taken and the peak RSS seen."""
    out = cwd / "out.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskd", *args],
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    began, peak = time.monotonic(), 0
    try:
        while proc.poll() is None:
            peak = max(peak, rss(proc.pid))
            elapsed = time.monotonic() - began
            if peak > MAX_RSS or elapsed > timeout:
                raise AssertionError(
                    f"taskd {' '.join(args)}: {elapsed:.1f}s, RSS {peak >> 20} MiB; "
                    f"output so far:\n{out.read_text()[-2000:]}"
                )
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out.read_text(), time.monotonic() - began, peak


def start_bounded(d: DaemonProc, timeout: float = 15.0) -> float:
    """Start the daemon and wait for ``started`` while watching its memory; the seconds taken."""
    began = time.monotonic()
    d.start(wait=False)
    while not d.events("started"):
        elapsed = time.monotonic() - began
        used = rss(d.pid)
        if used > MAX_RSS or elapsed > timeout or d.proc is None or d.proc.poll() is not None:
            d.kill()
            raise AssertionError(
                f"no 'started' after {elapsed:.1f}s (RSS {used >> 20} MiB); log tail:\n"
                + "\n".join(d.raw[-30:])
            )
        time.sleep(0.02)
    return time.monotonic() - began


def reload(d: DaemonProc, timeout: float = 5.0) -> dict[str, Any]:
    """SIGHUP, and the reloaded / reload_failed line it led to."""
    before = len(d.events("reloaded")) + len(d.events("reload_failed"))
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = d.events("reloaded") + d.events("reload_failed")
        if len(done) > before:
            return done[-1]
        assert rss(d.pid) < MAX_RSS
        time.sleep(0.02)
    raise AssertionError(f"no reloaded / reload_failed within {timeout}s")


# -- item 9: files in a plugin folder ---------------------------------------------------------

ODD = ("x.py", "z.py", "big.py")


def plant(folder: Path, which: tuple[str, ...] = ODD) -> None:
    """A FIFO x.py, z.py -> /dev/zero, a 2 MiB (valid Python) big.py."""
    if "x.py" in which:
        os.mkfifo(folder / "x.py")
    if "z.py" in which:
        (folder / "z.py").symlink_to("/dev/zero")
    if "big.py" in which:
        (folder / "big.py").write_text("X = 1\n" + "#" * 99 + "\n" * (2 * 1024 * 1024))


class TestOddPluginFiles:
    """A FIFO, a symlink to /dev/zero and a 2 MiB file in the plugin folder are reported by
    path; check, run and reload finish, the other plugins' jobs run, memory stays bounded."""

    @pytest.mark.parametrize("which", [ODD, ("x.py",), ("z.py",), ("big.py",)], ids="+".join)
    def test_check_names_each_and_finishes(self, tmp_path: Path, which: tuple[str, ...]) -> None:
        (tmp_path / "plugins.d").mkdir()
        (tmp_path / "plugins.d" / "echo.py").write_text(ECHO)
        plant(tmp_path / "plugins.d", which)
        (tmp_path / "taskd.toml").write_text(daemon_table() + TICK)
        code, output, took, _ = run_bounded(["check", "--config", "taskd.toml"], tmp_path)
        assert took < PROMPT, output
        assert code == 1, output  # folder problems are errors to `taskd check`
        for name in which:
            assert f"{tmp_path / 'plugins.d' / name}: " in output, output
        assert "FIFO" in output or "x.py" not in which
        assert "/dev/zero" in output or "z.py" not in which
        assert "over the limit" in output or "big.py" not in which

    def test_run_and_reload(self, daemon_factory) -> None:
        d = daemon_factory(TICK, {"echo.py": ECHO})
        folder = d.dir / "plugins.d"
        plant(folder)
        assert start_bounded(d) < PROMPT
        problems = {Path(e["path"]).name: e["problem"] for e in d.events("plugin_folder_problem")}
        assert set(problems) == set(ODD)
        d.wait_for("run", job="tick", outcome="succeeded", count=2, timeout=3)
        assert reload(d)["event"] == "reloaded"
        assert len(d.events("plugin_folder_problem")) == 2 * len(ODD)  # reported again
        ran = len(d.events("run", job="tick", outcome="succeeded"))
        d.wait_for("run", job="tick", outcome="succeeded", count=ran + 2, timeout=3)
        assert rss(d.pid) < MAX_RSS
        assert d.stop() == 0


# -- item 12: values read back from state ------------------------------------------------------


def stopped_daemon(daemon_factory: Any, config: str = TICK) -> DaemonProc:
    """A daemon that ran once (so its state_dir holds a database) and has stopped."""
    d = daemon_factory(config, {"echo.py": ECHO})
    d.start()
    d.wait_for("run", job="tick", outcome="succeeded", timeout=3)
    assert d.stop() == 0
    d.lines.clear()
    d.raw.clear()
    return d


def on_schedule(d: DaemonProc, count: int = 3) -> None:
    """The job runs, on its schedule: not a catch-up, not late."""
    runs = d.wait_for("run", job="tick", outcome="succeeded", count=count, timeout=4)
    for run in runs:
        assert "cause" not in run, run
        assert run["late"] < 1.0, run
    big_skips = [e for e in d.events("skipped") if e.get("count", 0) > 100]
    assert big_skips == []


class TestStateValues:
    """A bad value in the journal or the database is logged and ignored: the daemon starts
    promptly and the job runs on schedule, as if new."""

    @pytest.mark.parametrize(
        "trigger", ['every = "200ms"', 'cron = "* * * * * *"'], ids=["every", "cron"]
    )
    @pytest.mark.parametrize("value", ["inf", "1e12", "-1e308", "nan", "-5"])
    def test_bad_journal_tick(self, daemon_factory, value: str, trigger: str) -> None:
        config = TICK.replace('every = "200ms"', trigger)
        d = stopped_daemon(daemon_factory, config)
        # The journal's line format: "T <job> <tick>", tab-separated (taskd.state.journal).
        (d.dir / "state" / "ticks.journal").write_text(f"T\ttick\t{value}\n")
        assert start_bounded(d) < PROMPT
        (bad,) = d.events("state_value_invalid")
        assert (bad["job"], bad["field"], bad["value"]) == ("tick", "tick", value)
        assert "ticks.journal:1" in bad["source"]
        on_schedule(d, count=3 if trigger.startswith("every") else 2)
        assert d.stop() == 0

    def test_malformed_journal_lines_are_skipped_and_the_rest_replays(self, daemon_factory) -> None:
        d = stopped_daemon(daemon_factory)
        with contextlib.closing(d.db()) as db:
            (stored,) = db.execute("SELECT last_tick FROM jobs WHERE name='tick'").fetchone()
        later = stored + 0.2  # the next tick, as a daemon killed before its commit leaves it
        (d.dir / "state" / "ticks.journal").write_bytes(
            b"garbage\nT\ttick\tabc\nT\tti\nck\t1.0\nT\tt\xffick\t1.0\n"
            + f"T\ttick\t{later!r}\n".encode()
        )
        start_bounded(d)
        skipped = d.events("journal_line_skipped")
        assert [e["source"].rsplit(":", 1)[1] for e in skipped] == ["1", "2", "3", "4", "5"]
        assert d.events("journal_lines_skipped")[0]["count"] == 5
        (replayed,) = d.events("journal_replayed")
        assert replayed["ticks"] == 1
        on_schedule(d)
        assert d.stop() == 0

    @pytest.mark.parametrize(
        ("column", "value"),
        [
            ("last_tick", math.inf),
            ("last_tick", 1e12),
            ("last_tick", -1e308),
            ("last_tick", "abc"),
            ("last_outcome", "exploded"),
            ("last_result", "{not json"),
            ("last_started", math.inf),
        ],
    )
    def test_bad_database_value(self, daemon_factory, column: str, value: object) -> None:
        d = stopped_daemon(daemon_factory)
        path = d.dir / "state" / "state.db"
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(f"UPDATE jobs SET {column} = ? WHERE name = 'tick'", (value,))
        assert start_bounded(d) < PROMPT
        (bad,) = d.events("state_value_invalid")
        assert (bad["job"], bad["field"], bad["value"]) == ("tick", column, repr(value))
        assert f"state database {path}" in bad["source"]
        on_schedule(d)
        assert d.stop() == 0


# -- item 11: names that would tear the journal -------------------------------------------------

EVIL = '[jobs."evil\\n"]\ntype = "echo"\nevery = "50ms"\n'


def names_in_state(d: DaemonProc) -> set[str]:
    with contextlib.closing(d.db()) as db:
        jobs = {r[0] for r in db.execute("SELECT name FROM jobs")}
        runs = {r[0] for r in db.execute("SELECT job FROM runs")}
    return jobs | runs


class TestJobNameNeverReachesTheJournal:
    """A job name with a trailing newline is refused at every entry point, so neither the
    journal nor the database ever holds it."""

    def test_check_refuses_it(self, tmp_path: Path) -> None:
        (tmp_path / "plugins.d").mkdir()
        (tmp_path / "plugins.d" / "echo.py").write_text(ECHO)
        (tmp_path / "taskd.toml").write_text(daemon_table() + TICK + EVIL)
        code, output, _, _ = run_bounded(["check", "--config", "taskd.toml"], tmp_path)
        assert code != 0
        assert "evil" in output

    def test_run_refuses_it(self, daemon_factory) -> None:
        d = daemon_factory(TICK + EVIL, {"echo.py": ECHO})
        d.start(wait=False)
        assert d.wait_exit(timeout=10) != 0
        assert not d.events("started")
        journal = d.dir / "state" / "ticks.journal"
        assert not journal.exists() or b"evil" not in journal.read_bytes()

    def test_reload_refuses_it(self, daemon_factory) -> None:
        d = stopped_daemon(daemon_factory)
        start_bounded(d)
        d.write_config(TICK + EVIL)
        assert reload(d)["event"] == "reload_failed"
        on_schedule(d)
        journal = (d.dir / "state" / "ticks.journal").read_bytes()
        assert d.stop() == 0
        assert b"evil" not in journal
        assert names_in_state(d) == {"tick"}
        assert all(JOB_NAME.fullmatch(name) for name in names_in_state(d))
