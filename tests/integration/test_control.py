"""The control commands against a real daemon: status, jobs, trigger (each overlap policy),
pause / resume (also across a restart), synchronous reload, no or a stale daemon, hostile
clients on the raw socket, and peers of another uid."""

from __future__ import annotations

import contextlib
import grp
import itertools
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from taskd._version import __version__
from tests.helpers import REPO, DaemonProc, daemon_table, poll, run_cli

PLUGIN = """
import asyncio
from pathlib import Path

import taskd


async def echo(ctx, tag: str = "", seconds: float = 0.0) -> dict:
    if seconds:
        await asyncio.sleep(seconds)
    return {"tag": tag, "job": ctx.job}


async def boom(ctx, msg: str = "kaboom") -> None:
    raise RuntimeError(msg)


async def toggle(ctx, flag: str = "fail.flag") -> dict:
    # The daemon's cwd is its test folder: the test makes a run fail by creating the file.
    if Path(flag).exists():
        raise RuntimeError("the flag file is there")
    return {"ok": True}


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("echo", echo),
        taskd.JobType("boom", boom),
        taskd.JobType("toggle", toggle),
    ]
"""

BROKEN_PLUGIN = "import no_such_module_for_taskd_control_tests\n"
PLUGINS = {"ctl.py": PLUGIN}
WITH_BROKEN = {**PLUGINS, "sqlthing.py": BROKEN_PLUGIN}

TICK = """
[jobs.tick]
type = "echo"
every = "200ms"
"""

# Every job that the tests drive by hand has a schedule far away: only the test runs it.
HOURLY = """
[jobs.hour]
type = "echo"
every = "1h"

[jobs.far]
type = "echo"
every = "1h"
options = { seconds = 2.0 }

[jobs.parked]
type = "echo"
every = "1h"
"""

# A job whose plugin fails to import (BROKEN_PLUGIN): it is shown as broken, never run.
REPORT = """
[jobs.report]
type = "sql_query"
every = "1h"
"""

ACTIONS = """
[jobs.quick]
type = "echo"
every = "1h"
options = { tag = "hi" }

[jobs.fail]
type = "boom"
every = "1h"

[jobs.slow]
type = "echo"
every = "1h"
options = { seconds = 1.0 }
"""

SLOW = """
[jobs.slow]
type = "echo"
every = "1h"
overlap = "{overlap}"
options = {{ seconds = {seconds} }}
"""

PARKED = """
[jobs.parked]
type = "echo"
every = "200ms"
catchup = "latest"
"""

EPS = 0.002  # seconds of float slack on recorded times


# -- helpers ---------------------------------------------------------------------------------


def cli(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    """``taskd ARGS -c CONFIG`` against ``d``."""
    return run_cli(*args, "-c", str(d.config_path), timeout=30)


def cli_json(d: DaemonProc, *args: str) -> Any:
    result = cli(d, *args, "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def job_rows(d: DaemonProc, name: str | None = None) -> dict[str, dict[str, Any]]:
    data = cli_json(d, "jobs", *([name] if name else []))
    return {row["name"]: row for row in data["jobs"]}


def _ended(d: DaemonProc, job: str) -> list[dict[str, Any]]:
    """The job's history rows of runs that have ended."""
    return [r for r in d.history(job) if r["outcome"] != "running"]


def _ended_runs(d: DaemonProc, job: str, n: int) -> list[dict[str, Any]]:
    """The job's ``n`` ended runs from the history, once they are all on record."""
    rows: list[dict[str, Any]] = poll(lambda: len(x := _ended(d, job)) == n and x)
    return rows


def sock_path(d: DaemonProc) -> Path:
    return d.dir / "run" / "control.sock"


def table(text: str, first_header: str = "JOB") -> list[dict[str, str]]:
    """The rows of an aligned table as {header: cell}, checking the alignment: every column
    starts at its header's column, after a two-space gap."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(first_header + " "))
    header = lines[top]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    rows = []
    for line in lines[top + 1 :]:
        if not line or line.startswith("  "):  # notes under the table
            break
        for s in starts[1:]:
            assert line[s - 2 : s] == "  " and line[s] != " ", (
                f"column at {s} is not aligned:\n{header}\n{line}"
            )
        ends = [*starts[1:], None]
        rows.append({n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)})
    return rows


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def connect(d: DaemonProc, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path(d)))
    except BaseException:
        s.close()
        raise
    return s


def recv_reply(s: socket.socket) -> dict[str, Any]:
    """One reply line (the tests send one request at a time)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, f"connection closed without a full reply: {buf!r}"
        buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


def ask(s: socket.socket, line: bytes | dict[str, Any]) -> dict[str, Any]:
    s.sendall(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")
    return recv_reply(s)


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


# -- 1. every command, text and --json ---------------------------------------------------------


class TestStatus:
    """`taskd status` shows the daemon and its jobs."""

    def test_json(self, daemon_factory) -> None:
        d = daemon_factory(HOURLY + REPORT, WITH_BROKEN).start()
        started = d.wait_for("started")[0]
        assert cli(d, "pause", "parked").returncode == 0
        assert cli(d, "trigger", "far").returncode == 0
        data = cli_json(d, "status")
        daemon = data["daemon"]
        assert daemon["pid"] == d.pid
        assert daemon["version"] == __version__
        assert daemon["loop"] == started["loop"] and daemon["loop"] in ("asyncio", "uvloop")
        assert daemon["config"] == str(d.config_path)
        assert daemon["socket"] == str(sock_path(d))
        assert daemon["state_dir"] == str(d.dir / "state")
        assert (daemon["jobs"], daemon["running"], daemon["paused"], daemon["broken"]) == (
            4,
            1,
            1,
            1,
        )
        assert daemon["stopping"] is False and daemon["last_reload"] is None
        assert 0 <= daemon["uptime"] < 30
        states = {row["name"]: row["state"] for row in data["jobs"]}
        assert states == {"far": "running", "hour": "idle", "parked": "paused", "report": "broken"}

    def test_text(self, daemon_factory) -> None:
        d = daemon_factory(HOURLY + REPORT, WITH_BROKEN).start()
        loop = d.wait_for("started")[0]["loop"]
        assert cli(d, "pause", "parked").returncode == 0
        assert cli(d, "trigger", "far").returncode == 0
        result = cli(d, "status")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert re.fullmatch(
            rf"taskd {re.escape(__version__)}: running \(pid {d.pid}, {loop}, up \S+ since .+\)",
            lines[0],
        ), lines[0]
        assert f"  config: {d.config_path}" in lines
        assert f"  socket: {sock_path(d)}" in lines
        assert "  jobs:   4 scheduled, 1 running, 1 paused, 1 broken" in lines
        assert "  reload: none since start" in lines
        header = next(line for line in lines if line.startswith("JOB "))
        assert header.split() == [
            "JOB",
            "STATE",
            "NEXT",
            "LEFT",
            "LAST",
            "PASSED",
            "OUTCOME",
            "TOOK",
            "FAILS",
        ]
        rows = {r["JOB"]: r for r in table(result.stdout)}
        assert set(rows) == {"far", "hour", "parked", "report"}
        assert rows["far"]["STATE"].startswith("running ")
        assert rows["hour"]["STATE"] == "idle" and rows["hour"]["LEFT"].startswith("in ")
        assert rows["parked"]["STATE"] == "paused" and rows["parked"]["NEXT"] == "-"
        assert rows["report"]["STATE"] == "broken"
        assert "  report: broken: job type 'sql_query' not found" in result.stdout


class TestJobs:
    """`taskd jobs` shows each job's state, schedule, last and next run, and failures."""

    def test_json_states_schedule_last_and_next(self, daemon_factory) -> None:
        d = daemon_factory(TICK + HOURLY + REPORT, WITH_BROKEN).start()
        d.wait_for("run", job="tick", outcome="succeeded", timeout=3)
        assert cli(d, "pause", "parked").returncode == 0
        assert cli(d, "trigger", "far").returncode == 0
        data = cli_json(d, "jobs")
        now = data["now"]
        rows = {row["name"]: row for row in data["jobs"]}
        assert [row["name"] for row in data["jobs"]] == sorted(rows)
        assert set(rows) == {"far", "hour", "parked", "report", "tick"}
        assert rows["far"]["state"] == "running"
        assert [r["cause"] for r in rows["far"]["running"]] == ["manual"]
        assert rows["hour"]["state"] == "idle"
        assert rows["parked"]["state"] == "paused" and rows["parked"]["paused"] is True
        assert rows["report"]["state"] == "broken" and "sql_query" in rows["report"]["broken"]
        assert rows["tick"]["state"] in ("idle", "running")
        assert rows["tick"]["schedule"] == "every 200ms"
        assert {rows[n]["schedule"] for n in ("far", "hour", "parked", "report")} == {"every 1h"}
        assert rows["tick"]["last"]["outcome"] == "succeeded"
        assert rows["tick"]["last"]["started"] <= now
        assert rows["hour"]["last"] is None
        for name in ("far", "hour", "tick"):
            assert rows[name]["next"] is not None and rows[name]["next"] > now, rows[name]
        assert rows["hour"]["next"] <= now + 3600
        assert rows["parked"]["next"] is None and rows["report"]["next"] is None
        assert all(row["failures"] == 0 for row in rows.values())

    def test_text_table(self, daemon_factory) -> None:
        d = daemon_factory(TICK + HOURLY + REPORT, WITH_BROKEN).start()
        d.wait_for("run", job="tick", outcome="succeeded", timeout=3)
        assert cli(d, "pause", "parked").returncode == 0
        result = cli(d, "jobs")
        assert result.returncode == 0, result.stderr
        header = result.stdout.splitlines()[0]
        assert header.split() == [
            "JOB",
            "STATE",
            "NEXT",
            "LEFT",
            "LAST",
            "PASSED",
            "OUTCOME",
            "TOOK",
            "FAILS",
            "SCHEDULE",
        ]
        rows = {r["JOB"]: r for r in table(result.stdout)}
        assert rows["parked"]["STATE"] == "paused"
        assert rows["report"]["STATE"] == "broken"
        assert rows["hour"]["STATE"] == "idle" and rows["hour"]["OUTCOME"] == "-"
        assert rows["tick"]["OUTCOME"] == "succeeded"
        assert rows["tick"]["SCHEDULE"] == "every 200ms"
        assert rows["hour"]["SCHEDULE"] == "every 1h"
        assert rows["hour"]["LEFT"].startswith("in ")

    def test_consecutive_failures_count_up_and_reset(self, daemon_factory) -> None:
        d = daemon_factory('[jobs.flip]\ntype = "toggle"\nevery = "200ms"\n', PLUGINS).start()
        d.wait_for("run", job="flip", outcome="succeeded", timeout=3)
        flag = d.dir / "fail.flag"
        flag.touch()
        row = poll(lambda: (r := job_rows(d, "flip")["flip"])["failures"] >= 1 and r, timeout=3)
        assert row["last"]["outcome"] == "failed"
        assert row["last"]["error"] == "RuntimeError: the flag file is there"
        first = row["failures"]
        # It counts up with each further failed run.
        poll(lambda: job_rows(d, "flip")["flip"]["failures"] > first, timeout=3)
        text = cli(d, "jobs", "flip")
        row = table(text.stdout)[0]
        assert row["OUTCOME"] == "failed" and int(row["FAILS"]) >= 2
        assert "  flip: last error: RuntimeError: the flag file is there" in text.stdout
        flag.unlink()
        row = poll(lambda: (r := job_rows(d, "flip")["flip"])["failures"] == 0 and r, timeout=3)
        assert row["last"]["outcome"] == "succeeded" and row["last"]["error"] is None

    def test_one_job(self, daemon_factory) -> None:
        d = daemon_factory(HOURLY, PLUGINS).start()
        data = cli_json(d, "jobs", "far")
        assert [row["name"] for row in data["jobs"]] == ["far"]
        result = cli(d, "jobs", "hour")
        assert result.returncode == 0, result.stderr
        assert [r["JOB"] for r in table(result.stdout)] == ["hour"]

    def test_unknown_job_suggests(self, daemon_factory) -> None:
        d = daemon_factory(HOURLY, PLUGINS).start()
        result = cli(d, "jobs", "parkd")
        assert result.returncode == 1
        assert "no job 'parkd'" in result.stderr
        assert "did you mean 'parked'?" in result.stderr
        assert result.stdout == ""
        result = cli(d, "jobs", "parkd", "--json")
        assert result.returncode == 1
        assert json.loads(result.stdout)["error"]["code"] == "not_found"


class TestTrigger:
    """`taskd trigger` starts a manual run; with --wait it reports how the run ended."""

    def test_starts_a_manual_run(self, daemon_factory) -> None:
        d = daemon_factory(ACTIONS, PLUGINS).start()
        result = cli(d, "trigger", "quick")
        assert result.returncode == 0, result.stderr
        m = re.fullmatch(r"quick: started run (\S+)\n", result.stdout)
        assert m, result.stdout
        run_id = m.group(1)
        line = d.wait_for("run", job="quick", run_id=run_id, timeout=3)[0]
        assert line["cause"] == "manual" and line["outcome"] == "succeeded"
        row = poll(lambda: [r for r in d.history("quick") if r["outcome"] == "succeeded"])[0]
        assert (row["run_id"], row["trigger"]) == (run_id, "manual")

    def test_json(self, daemon_factory) -> None:
        d = daemon_factory(ACTIONS, PLUGINS).start()
        data = cli_json(d, "trigger", "quick")
        assert data["job"] == "quick" and data["state"] == "started"
        d.wait_for("run", job="quick", run_id=data["run_id"], cause="manual", timeout=3)

    def test_wait_success(self, daemon_factory) -> None:
        d = daemon_factory(ACTIONS, PLUGINS).start()
        result = cli(d, "trigger", "quick", "--wait")
        assert result.returncode == 0, result.stderr
        first, _, rest = result.stdout.partition("\n")
        m = re.fullmatch(r"quick: succeeded in \S+ \(run (\S+)\)", first)
        assert m, first
        assert json.loads(rest) == {"tag": "hi", "job": "quick"}
        # --wait returned after the run ended: it is on record already (or within a tick).
        row = poll(lambda: [r for r in d.history("quick") if r["run_id"] == m.group(1)])[0]
        assert (row["outcome"], row["trigger"]) == ("succeeded", "manual")

    def test_wait_failure(self, daemon_factory) -> None:
        d = daemon_factory(ACTIONS, PLUGINS).start()
        result = cli(d, "trigger", "fail", "--wait")
        assert result.returncode == 1
        assert result.stdout == ""
        assert re.fullmatch(
            r"fail: failed in \S+ \(run \S+\): RuntimeError: kaboom\n", result.stderr
        ), result.stderr

    def test_wait_json(self, daemon_factory) -> None:
        d = daemon_factory(ACTIONS, PLUGINS).start()
        data = cli_json(d, "trigger", "quick", "--wait")
        assert (data["outcome"], data["cause"], data["error"]) == ("succeeded", "manual", None)
        assert data["result"] == {"tag": "hi", "job": "quick"}
        d.wait_for("run", job="quick", run_id=data["run_id"], timeout=3)
        result = cli(d, "trigger", "fail", "--wait", "--json")
        assert result.returncode == 1
        data = json.loads(result.stdout)
        assert data["outcome"] == "failed" and data["error"] == "RuntimeError: kaboom"
        assert data["result"] is None and data["run_id"]

    def test_wait_takes_as_long_as_the_run(self, daemon_factory) -> None:
        d = daemon_factory(ACTIONS, PLUGINS).start()
        t0 = time.monotonic()
        data = cli_json(d, "trigger", "slow", "--wait")
        assert time.monotonic() - t0 >= 1.0
        assert data["outcome"] == "succeeded" and data["duration"] >= 1.0 - EPS

    def test_paused_job_can_be_triggered(self, daemon_factory) -> None:
        d = daemon_factory(ACTIONS, PLUGINS).start()
        assert cli(d, "pause", "quick").returncode == 0
        data = cli_json(d, "trigger", "quick", "--wait")
        assert data["outcome"] == "succeeded"
        assert job_rows(d, "quick")["quick"]["state"] == "paused"

    def test_disabled_job_is_named_as_such(self, daemon_factory) -> None:
        config = ACTIONS + '\n[jobs.off]\ntype = "echo"\nevery = "1h"\nenabled = false\n'
        d = daemon_factory(config, PLUGINS).start()
        for args in (("trigger", "off"), ("jobs", "off"), ("pause", "off")):
            result = cli(d, *args)
            assert result.returncode == 1, args
            assert f"job 'off' is disabled in {d.config_path} (enabled = false)" in result.stderr

    def test_wait_across_a_stop_gets_the_outcome(self, daemon_factory) -> None:
        """The socket stays open through the drain: a `--wait` learns how its run ended, and
        while draining, status answers (stopping) and actions are refused."""
        d = daemon_factory(ACTIONS, PLUGINS).start()
        waiting = subprocess.Popen(
            [sys.executable, "-m", "taskd", "trigger", "slow", "--wait", "-c", str(d.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            poll(lambda: job_rows(d, "slow")["slow"]["running"], timeout=3)
            d.signal(signal.SIGTERM)
            d.wait_for("draining", timeout=3)
            status = cli_json(d, "status")
            assert status["daemon"]["stopping"] is True
            assert [j["name"] for j in status["jobs"] if j["state"] == "running"] == ["slow"]
            refused = cli(d, "pause", "slow")
            assert refused.returncode == 1 and "taskd is stopping" in refused.stderr
            out, err = waiting.communicate(timeout=5)
        finally:
            waiting.kill()
            waiting.communicate()
        assert waiting.returncode == 0, err
        assert out.startswith("slow: succeeded"), out
        assert d.wait_exit() == 0

    def test_unknown_and_broken_jobs_are_refused(self, daemon_factory) -> None:
        d = daemon_factory(HOURLY + REPORT, WITH_BROKEN).start()
        result = cli(d, "trigger", "hou")
        assert result.returncode == 1
        assert "no job 'hou'" in result.stderr and "did you mean 'hour'?" in result.stderr
        result = cli(d, "trigger", "report")
        assert result.returncode == 1
        assert "job 'report' was not run: the job is broken" in result.stderr


class TestTriggerOverlap:
    """A manual run obeys the job's overlap policy against a run in flight."""

    def _start(self, daemon_factory, overlap: str, seconds: float = 1.0) -> tuple[DaemonProc, str]:
        d = daemon_factory(SLOW.format(overlap=overlap, seconds=seconds), PLUGINS).start()
        data = cli_json(d, "trigger", "slow")
        assert data["state"] == "started"
        return d, data["run_id"]

    def test_skip_refuses_a_second_run(self, daemon_factory) -> None:
        # Three CLI calls must all land while the first run goes: 4 s leaves room on a
        # loaded machine (with 1 s the run ended before the third call under CI load).
        d, first = self._start(daemon_factory, "skip", seconds=4.0)
        result = cli(d, "trigger", "slow")
        assert result.returncode == 1
        assert "job 'slow' was not run: a run is already going" in result.stderr
        assert 'overlap = "skip"' in result.stderr
        result = cli(d, "trigger", "slow", "--json")
        assert result.returncode == 1
        assert json.loads(result.stdout)["error"]["code"] == "refused"
        d.wait_for("trigger_refused", job="slow", reason="overlap", timeout=2)
        d.wait_for("run", job="slow", run_id=first, outcome="succeeded", timeout=8)
        rows = poll(lambda: [r for r in d.history("slow") if r["outcome"] != "running"])
        assert [r["run_id"] for r in rows] == [first]
        assert len(d.history("slow")) == 1

    def test_queue_runs_the_second_after_the_first(self, daemon_factory) -> None:
        d, first = self._start(daemon_factory, "queue")
        result = cli(d, "trigger", "slow")
        assert result.returncode == 0, result.stderr
        assert result.stdout == 'slow: queued behind the run in flight (overlap = "queue")\n'
        assert job_rows(d, "slow")["slow"]["queued"] == 1
        d.wait_for("run", job="slow", outcome="succeeded", count=2, timeout=4)
        rows = _ended_runs(d, "slow", 2)
        a, b = sorted(rows, key=lambda r: r["started"])
        assert a["run_id"] == first
        assert b["started"] >= a["started"] + a["duration"] - EPS, (a, b)
        assert {a["trigger"], b["trigger"]} == {"manual"}

    def test_replace_cancels_the_first(self, daemon_factory) -> None:
        d = daemon_factory(SLOW.format(overlap="replace", seconds=1.0), PLUGINS).start()
        waiting = subprocess.Popen(
            [sys.executable, "-m", "taskd", "trigger", "slow", "--wait", "-c", str(d.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            running = poll(lambda: job_rows(d, "slow")["slow"]["running"], timeout=3)
            first = running[0]["run_id"]
            data = cli_json(d, "trigger", "slow", "--wait")
            out, err = waiting.communicate(timeout=5)
        finally:
            waiting.kill()
            waiting.communicate()
        assert data["outcome"] == "succeeded" and data["run_id"] != first
        # The first trigger's --wait learns that its run was replaced.
        assert waiting.returncode == 1 and out == ""
        assert re.fullmatch(
            rf"slow: cancelled in \S+ \(run {first}\): replaced by a newer run\n", err
        ), err
        old = d.wait_for("run", job="slow", run_id=first, timeout=2)[0]
        assert old["outcome"] == "cancelled", old
        assert old["duration"] < 1.0
        rows = {r["run_id"]: r for r in _ended_runs(d, "slow", 2)}
        assert rows[first]["outcome"] == "cancelled"
        assert rows[data["run_id"]]["outcome"] == "succeeded"

    def test_allow_runs_both_at_once(self, daemon_factory) -> None:
        d, first = self._start(daemon_factory, "allow")
        second = cli_json(d, "trigger", "slow")
        assert second["state"] == "started" and second["run_id"] != first
        assert len(job_rows(d, "slow")["slow"]["running"]) == 2
        d.wait_for("run", job="slow", outcome="succeeded", count=2, timeout=4)
        rows = _ended_runs(d, "slow", 2)
        a, b = sorted(rows, key=lambda r: r["started"])
        assert b["started"] < a["started"] + a["duration"], (a, b)


class TestPause:
    """`taskd pause` / `taskd resume` say what they changed."""

    def test_text(self, daemon_factory) -> None:
        d = daemon_factory(HOURLY, PLUGINS).start()
        assert cli(d, "pause", "hour").stdout == "hour: paused\n"
        result = cli(d, "pause", "hour")
        assert (result.returncode, result.stdout) == (0, "hour: already paused\n")
        assert job_rows(d, "hour")["hour"]["state"] == "paused"
        d.wait_for("paused", job="hour", timeout=2)
        assert cli(d, "resume", "hour").stdout == "hour: resumed\n"
        result = cli(d, "resume", "hour")
        assert (result.returncode, result.stdout) == (0, "hour: already running on schedule\n")
        assert job_rows(d, "hour")["hour"]["state"] == "idle"
        d.wait_for("resumed", job="hour", timeout=2)

    def test_json(self, daemon_factory) -> None:
        d = daemon_factory(HOURLY, PLUGINS).start()
        assert cli_json(d, "pause", "hour") == {"job": "hour", "paused": True, "changed": True}
        assert cli_json(d, "pause", "hour") == {"job": "hour", "paused": True, "changed": False}
        assert cli_json(d, "resume", "hour") == {"job": "hour", "paused": False, "changed": True}
        assert cli_json(d, "resume", "hour") == {
            "job": "hour",
            "paused": False,
            "changed": False,
        }

    def test_unknown_job(self, daemon_factory) -> None:
        d = daemon_factory(HOURLY, PLUGINS).start()
        for cmd in ("pause", "resume"):
            result = cli(d, cmd, "hours")
            assert result.returncode == 1
            assert "no job 'hours'" in result.stderr and "did you mean 'hour'?" in result.stderr


# -- 3. pause across a restart; resume and catchup ---------------------------------------------


class TestPausePersists:
    """A pause is stored: it holds across a restart; a resume catches up per catchup."""

    def test_pause_survives_a_restart(self, daemon_factory) -> None:
        config = TICK + PARKED
        d = daemon_factory(config, PLUGINS).start()
        d.wait_for("run", job="parked", timeout=3)
        assert cli(d, "pause", "parked").returncode == 0
        assert d.stop() == 0
        again = daemon_factory(config, PLUGINS).start()  # the same name: the same folder
        assert again.dir == d.dir
        assert job_rows(again, "parked")["parked"]["state"] == "paused"
        rows = table(cli(again, "jobs").stdout)
        assert {r["JOB"]: r["STATE"] for r in rows}["parked"] == "paused"
        again.wait_for("run", job="tick", count=5, timeout=3)  # ~1s of a running schedule
        assert again.events("run", job="parked") == []
        result = cli(again, "resume", "parked")
        assert result.stdout == "parked: resumed\n"
        again.wait_for("run", job="parked", outcome="succeeded", count=2, timeout=2)

    def test_resume_runs_the_latest_tick_once(self, daemon_factory) -> None:
        d = daemon_factory(PARKED, PLUGINS).start()
        d.wait_for("run", job="parked", timeout=3)
        assert cli(d, "pause", "parked").returncode == 0
        paused_at = epoch(d.wait_for("paused", job="parked", timeout=2)[0]["timestamp"])
        time.sleep(1.0)  # the pause itself is what is tested: ~5 ticks come meanwhile
        assert cli(d, "resume", "parked").returncode == 0
        resumed_at = epoch(d.wait_for("resumed", job="parked", timeout=2)[0]["timestamp"])
        skipped = d.wait_for("skipped", job="parked", reason="paused", timeout=2)
        assert len(skipped) == 1 and skipped[0]["count"] >= 3, skipped
        assert epoch(skipped[0]["first"]) > paused_at - 0.2
        d.wait_for("run", job="parked", outcome="succeeded", count=3, timeout=3)
        rows = _ended(d, "parked")
        during = [r for r in rows if paused_at + EPS < r["started"] < resumed_at]
        assert during == [], during
        # One run stands for the ticks of the pause: the latest, started at once.
        caught = [r for r in rows if paused_at < r["scheduled"] <= resumed_at + EPS]
        assert len(caught) == 1, caught
        assert caught[0]["scheduled"] > resumed_at - 0.2 - EPS
        assert caught[0]["started"] - resumed_at < 0.15


# -- 4. synchronous reload ---------------------------------------------------------------------


BAD_CONFIG = (
    TICK
    + """
[jobs.other]
type = "echo"
every = "1h"
evry = "1h"

[jobs.third]
type = "echo"
every = "1h"
overlap = "skp"
"""
)


class TestReload:
    """`taskd reload` applies the config before it answers, or says every reason it cannot."""

    def test_added_and_removed_jobs_are_printed(self, daemon_factory) -> None:
        gone = '\n[jobs.gone]\ntype = "echo"\nevery = "1h"\n'
        fresh = '\n[jobs.fresh]\ntype = "echo"\nevery = "200ms"\n'
        d = daemon_factory(TICK + gone, PLUGINS).start()
        d.wait_for("run", job="tick", timeout=3)
        d.write_config(TICK + fresh)
        asked = time.time()
        result = cli(d, "reload")
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(r"reloaded in \S+: added fresh; removed gone\n", result.stdout), (
            result.stdout
        )
        line = d.wait_for("reloaded", timeout=2)[0]
        assert (line["added"], line["removed"]) == (["fresh"], ["gone"])
        d.wait_for("run", job="fresh", outcome="succeeded", count=2, timeout=3)
        first = min(d.history("fresh"), key=lambda r: r["started"])
        assert first["started"] >= asked
        assert set(job_rows(d)) == {"tick", "fresh"}
        last = cli_json(d, "status")["daemon"]["last_reload"]
        assert last["ok"] is True and last["added"] == ["fresh"] and last["removed"] == ["gone"]

    def test_json_and_no_change(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        result = cli(d, "reload")
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(r"reloaded in \S+: no job changed\n", result.stdout), result.stdout
        d.write_config(TICK.replace("200ms", "400ms"))
        data = cli_json(d, "reload")
        assert data["ok"] is True and data["errors"] == []
        assert (data["added"], data["changed"], data["removed"]) == ([], ["tick"], [])
        assert job_rows(d, "tick")["tick"]["schedule"] == "every 400ms"

    def test_invalid_config_lists_every_error_and_keeps_old_jobs(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        d.wait_for("run", job="tick", timeout=3)
        d.write_config(BAD_CONFIG)
        result = cli(d, "reload")
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert lines[0] == "taskd: reload failed; the previous config keeps running (2 errors):"
        errors = lines[1:]
        assert len(errors) == 2, errors
        assert any("jobs.other.evry" in e and "unknown key 'evry'" in e for e in errors), errors
        assert any("jobs.third.overlap" in e for e in errors), errors
        assert all(str(d.config_path) in e for e in errors), errors
        have = len(d.events("run", job="tick"))
        d.wait_for("run", job="tick", count=have + 3, timeout=3)
        assert set(job_rows(d)) == {"tick"}
        status = cli(d, "status")
        assert "  reload: FAILED " in status.stdout
        assert "jobs.other.evry" in status.stdout

    def test_invalid_config_json(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        d.write_config(BAD_CONFIG)
        result = cli(d, "reload", "--json")
        assert result.returncode == 1
        data = json.loads(result.stdout)
        assert data["ok"] is False and len(data["errors"]) == 2
        assert (data["added"], data["changed"], data["removed"]) == ([], [], [])
        assert any("jobs.other.evry" in e for e in data["errors"])
        assert cli_json(d, "status")["daemon"]["last_reload"]["ok"] is False

    def test_concurrent_reloads_are_each_answered(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        d.write_config(TICK + '\n[jobs.fresh]\ntype = "echo"\nevery = "1h"\n')
        argv = [sys.executable, "-m", "taskd", "reload", "--json", "-c", str(d.config_path)]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(4)]
        replies = [json.loads(p.communicate(timeout=10)[0]) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4
        assert all(r["ok"] for r in replies), replies
        # "fresh" is added exactly once, by whichever reload ran first.
        assert sorted(n for r in replies for n in r["added"]) == ["fresh"]
        assert set(job_rows(d)) == {"tick", "fresh"}

    def test_broken_daemon_table_still_finds_the_socket(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace("[daemon]\n", '[daemon]\nlog_levle = "debug"\n'))
        # The config no longer loads; its runtime_dir is still read from the [daemon] table.
        result = cli(d, "reload")
        assert result.returncode == 1, result.stderr
        assert "daemon.log_levle" in result.stderr, result.stderr
        assert "no taskd is running" not in result.stderr
        assert cli_json(d, "status")["daemon"]["pid"] == d.pid


# -- 5. no daemon, or a stale socket -----------------------------------------------------------


NO_DAEMON_COMMANDS = [("status",), ("trigger", "x"), ("reload",), ("jobs",), ("pause", "x")]


class TestNoDaemon:
    """With no daemon the commands exit 3 and say so, also with a killed daemon's socket."""

    @pytest.mark.parametrize("args", NO_DAEMON_COMMANDS, ids=lambda a: a[0])
    def test_never_started(self, daemon_factory, args: tuple[str, ...]) -> None:
        d = daemon_factory(TICK, PLUGINS)  # not started
        result = cli(d, *args)
        assert result.returncode == 3, result.stderr
        assert result.stderr == (
            f"taskd: no taskd is running (no control socket at {sock_path(d)})\n"
        )
        assert result.stdout == ""

    def test_stale_socket_after_kill(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        assert cli(d, "status").returncode == 0
        d.kill()
        path = sock_path(d)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind by the SIGKILL
        for args in (("status",), ("trigger", "tick"), ("reload",)):
            result = cli(d, *args)
            assert result.returncode == 3, (args, result.stderr)
            assert "no taskd is running" in result.stderr
            assert "stale" in result.stderr, result.stderr
        again = daemon_factory(TICK, PLUGINS).start()
        assert again.dir == d.dir
        again.wait_for("control_stale_socket_replaced", path=str(path), timeout=2)
        assert cli_json(again, "status")["daemon"]["pid"] == again.pid


# -- 6. hostile clients --------------------------------------------------------------------


class TestHostileClients:
    """Raw clients misbehaving on the socket get a clear error; others are still served."""

    def test_over_long_line_is_refused_and_closed(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        with connect(d) as s:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(b"x" * (1 << 20))  # 1 MiB, no newline
            reply = recv_reply(s)
            assert reply["ok"] is False and reply["error"]["code"] == "too_long", reply
            assert "longer than 65536 bytes" in reply["error"]["message"]
            assert closed_by_peer(s)
        assert cli_json(d, "status")["daemon"]["pid"] == d.pid

    def test_silent_client_does_not_block_others(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        d.wait_for("run", job="tick", timeout=3)
        with connect(d) as silent:
            have = len(d.events("run", job="tick"))
            assert cli_json(d, "status")["daemon"]["pid"] == d.pid
            with connect(d) as other:
                assert ask(other, {"v": 1, "cmd": "ping"})["data"]["pid"] == d.pid
            d.wait_for("run", job="tick", count=have + 3, timeout=2)
            # Still connected, still unanswered: nothing was sent, so nothing is due.
            assert select.select([silent], [], [], 0)[0] == []
        assert cli(d, "status").returncode == 0

    def test_connection_cap(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        d.wait_for("run", job="tick", count=2, timeout=3)
        clients: list[socket.socket] = []
        try:
            opened = time.time()
            for _ in range(70):
                clients.append(connect(d))
            busy: dict[int, dict[str, Any]] = {}

            def six_busy() -> bool:
                for i, s in enumerate(clients):
                    if i not in busy and select.select([s], [], [], 0)[0]:
                        busy[i] = recv_reply(s)
                return len(busy) >= 6

            poll(six_busy, timeout=3)
            assert sorted(busy) == list(range(64, 70)), sorted(busy)
            for reply in busy.values():
                assert reply["error"]["code"] == "busy", reply
                assert "64 control connections open" in reply["error"]["message"]
            assert all(closed_by_peer(clients[i]) for i in busy)
            # The 64 slots are all taken: a command is turned away, not left hanging.
            result = cli(d, "status")
            assert result.returncode == 1
            assert "64 control connections open" in result.stderr
            have = len(d.events("run", job="tick"))
            d.wait_for("run", job="tick", count=have + 5, timeout=3)
            assert [i for i in range(64) if select.select([clients[i]], [], [], 0)[0]] == []
            held = time.time()
            for s in clients[:3]:
                s.close()
            status = poll(lambda: (r := cli(d, "status", "--json")).returncode == 0 and r)
            assert json.loads(status.stdout)["daemon"]["pid"] == d.pid
        finally:
            for s in clients:
                s.close()
        rows = [r for r in _ended(d, "tick") if opened <= r["scheduled"] <= held]
        assert len(rows) >= 5, rows
        starts = sorted(r["started"] for r in rows)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert max(gaps) < 0.6, gaps
        late = [r["started"] - r["scheduled"] for r in rows]
        assert max(late) < 0.1, late
        d.wait_for("control_busy", timeout=2)

    def test_garbage_then_a_valid_request(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        with connect(d) as s:
            reply = ask(s, b"{nope\n")
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
            assert "not valid JSON" in reply["error"]["message"]
            reply = ask(s, {"v": 1, "cmd": "status"})
            assert reply["ok"] is True and reply["data"]["daemon"]["pid"] == d.pid

    @pytest.mark.parametrize(
        ("line", "needle"),
        [
            (b'{"v":1,"cmd":""}\n', "must be a non-empty string, got an empty string"),
            (b'{"v":1,"cmd":"ping","x":NaN}\n', "bad request line: NaN is not valid JSON"),
            (
                b'{"v":1,"cmd":"trigger","args":{"job":"tick","wait":"no"}}\n',
                "args.wait: true or false",
            ),
        ],
    )
    def test_bad_fields_are_named(self, daemon_factory, line: bytes, needle: str) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        with connect(d) as s:
            reply = ask(s, line)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
        assert needle in reply["error"]["message"], reply

    def test_pipelined_requests_are_answered_in_order(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        with connect(d) as s:
            s.sendall(
                b'{"v":1,"cmd":"ping"}\n'
                b'{"v":1,"cmd":"nope"}\n'
                b'{"v":1,"cmd":"jobs","args":{"job":"tick"}}\n'
            )
            buf = b""
            while buf.count(b"\n") < 3:
                chunk = s.recv(65536)
                assert chunk, buf
                buf += chunk
        first, second, third = (json.loads(x) for x in buf.splitlines())
        assert first["ok"] is True and first["data"]["pid"] == d.pid
        assert second["ok"] is False and second["error"]["code"] == "unknown_command"
        assert [r["name"] for r in third["data"]["jobs"]] == ["tick"]

    def test_line_without_newline_at_close(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        with connect(d) as s:
            s.sendall(b'{"v":1,"cmd":"ping"}')
            s.shutdown(socket.SHUT_WR)
            reply = recv_reply(s)
            assert reply["error"]["code"] == "bad_request"
            assert "does not end with a newline" in reply["error"]["message"]
            assert closed_by_peer(s)

    def test_wrong_version(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        with connect(d) as s:
            reply = ask(s, {"v": 2, "cmd": "status"})
            assert reply["v"] == 1 and reply["ok"] is False
            assert reply["error"]["code"] == "version"
            assert "version 2" in reply["error"]["message"]
            assert ask(s, {"v": 1, "cmd": "ping"})["ok"] is True

    def test_unknown_command_suggests(self, daemon_factory) -> None:
        d = daemon_factory(TICK, PLUGINS).start()
        with connect(d) as s:
            reply = ask(s, {"v": 1, "cmd": "statsu"})
            assert reply["ok"] is False and reply["error"]["code"] == "unknown_command"
            assert "did you mean 'status'?" in reply["error"]["message"], reply
            assert ask(s, {"v": 1, "cmd": "ping"})["ok"] is True


# -- 7. peers of another uid ---------------------------------------------------------------


PEER_USER = "taskd-ctl-peer"
PEER_GROUP = "taskd-ctl-peers"


@dataclass(frozen=True)
class Peer:
    """The throwaway user, and how to run `taskd` as it."""

    uid: int
    gid: int
    ctl_gid: int
    python: str
    env: dict[str, str]

    def run(
        self, *args: str, extra_groups: list[int] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``python -m taskd ARGS`` as the peer user, with only ``extra_groups`` besides its
        own group (not root's)."""
        return subprocess.run(
            [self.python, "-m", "taskd", *args],
            user=self.uid,
            group=self.gid,
            extra_groups=extra_groups or [],
            env=self.env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=30,
        )


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    """A throwaway system user (and a group it belongs to), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a throwaway user needs root")
    try:
        try:
            grp.getgrnam(PEER_GROUP)
        except KeyError:
            _sh("groupadd", "--system", PEER_GROUP)
        try:
            pwd.getpwnam(PEER_USER)
        except KeyError:
            _sh(
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PEER_USER,
            )
        _sh("usermod", "--append", "--groups", PEER_GROUP, PEER_USER)
        pw = pwd.getpwnam(PEER_USER)
        ctl_gid = grp.getgrnam(PEER_GROUP).gr_gid
        # The venv's python may sit under a home only root can enter; any CPython of the same
        # minor version can import taskd from the checkout and the venv's packages.
        site = Path(structlog.__file__).resolve().parent.parent
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/",
            "PYTHONPATH": f"{REPO}{os.pathsep}{site}",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        candidates = [sys.executable, os.path.realpath(sys.executable)]
        candidates += [p for p in (shutil.which("python3"), "/usr/bin/python3") if p]
        python = None
        for exe in dict.fromkeys(candidates):
            try:
                probe = subprocess.run(
                    [exe, "-c", "import taskd.cli.remote"],
                    user=pw.pw_uid,
                    group=pw.pw_gid,
                    extra_groups=[],
                    env=env,
                    cwd="/",
                    capture_output=True,
                )
            except OSError:  # not executable for this user
                continue
            if probe.returncode == 0:
                python = exe
                break
        assert python is not None, f"no python that {PEER_USER} may run imports taskd"
        yield Peer(pw.pw_uid, pw.pw_gid, ctl_gid, python, env)
    finally:
        subprocess.run(["userdel", PEER_USER], capture_output=True)
        subprocess.run(["groupdel", PEER_GROUP], capture_output=True)


@contextlib.contextmanager
def reachable(dirs: list[Path]) -> Iterator[None]:
    """Let others traverse ``dirs`` for the duration (tmp_path folders are 0700)."""
    saved: dict[Path, int] = {}
    try:
        for p in dirs:
            mode = stat.S_IMODE(os.stat(p).st_mode)
            if not mode & stat.S_IXOTH:
                saved[p] = mode
                os.chmod(p, mode | stat.S_IXOTH)
        yield
    finally:
        for p, mode in saved.items():
            with contextlib.suppress(OSError):
                os.chmod(p, mode)


class TestPeerCredentials:
    """The daemon checks each peer's uid, whatever the socket file's mode lets through."""

    def test_other_uid_is_refused(self, daemon_factory, peer: Peer) -> None:
        d = daemon_factory(HOURLY, PLUGINS).start()
        path = sock_path(d)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        run_dir = path.parent
        with reachable([*reversed(run_dir.parents), run_dir]):
            os.chmod(path, 0o666)  # the file mode no longer keeps the peer out
            try:
                result = peer.run("status", "--socket", str(path))
            finally:
                os.chmod(path, 0o600)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert f"uid {peer.uid} may not use the control socket" in result.stderr
        assert result.stdout == ""
        d.wait_for("control_forbidden", uid=peer.uid, timeout=2)
        assert cli_json(d, "status")["daemon"]["pid"] == d.pid

    def test_member_of_control_group_is_allowed(self, daemon_factory, peer: Peer) -> None:
        config = daemon_table(control_group=f'"{PEER_GROUP}"') + HOURLY
        d = daemon_factory(config, PLUGINS).start()
        path = sock_path(d)
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, peer.ctl_gid)
        st = os.stat(path.parent)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, peer.ctl_gid)
        with reachable(list(reversed(path.parent.parents))):  # up to, not into, run/
            result = peer.run(
                "status", "--json", "--socket", str(path), extra_groups=[peer.ctl_gid]
            )
            assert result.returncode == 0, (result.stdout, result.stderr)
            assert json.loads(result.stdout)["daemon"]["pid"] == d.pid
            # Without the group in its process the same user is kept out by the file modes.
            result = peer.run("status", "--socket", str(path))
            assert result.returncode == 1
            assert "permission denied" in result.stderr, result.stderr
