"""``taskd history`` against a real daemon's state: while it runs, after it stopped, after it
was killed, with a config that has since become invalid."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from taskd.cli import fmt
from tests.helpers import DaemonProc, poll, run_cli

PLUGIN = """
import asyncio

import taskd


async def big(ctx, size: int = 5000) -> dict:
    return {"blob": "x" * size, "size": size, "job": ctx.job}


def boom(msg: str = "kaboom") -> None:
    raise RuntimeError(msg)


async def sleepy(ctx, seconds: float = 60.0) -> None:
    await asyncio.sleep(seconds)


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("big", big),
        taskd.JobType("boom", boom, kind="blocking"),
        taskd.JobType("sleepy", sleepy),
    ]
"""

JOBS = """
[jobs.big]
type = "big"
every = "150ms"

[jobs.fail]
type = "boom"
every = "150ms"
options = { msg = "disk on fire\\nsecond line" }

[jobs.later]
type = "big"
at = 2099-01-01T00:00:00Z
"""

PLUGINS = {"jobs.py": PLUGIN}
WIDTH = "120"  # COLUMNS for the text output: the table must fit it


def history(d: DaemonProc, *args: str, env: dict[str, str] | None = None) -> Any:
    """``taskd history ARGS -c CONFIG``, the CompletedProcess."""
    return run_cli(
        "history", *args, "-c", str(d.config_path), env={"COLUMNS": WIDTH, **(env or {})}
    )


def history_json(d: DaemonProc, *args: str) -> list[dict[str, Any]]:
    result = history(d, "--json", *args)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def state_files(d: DaemonProc) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (d.dir / "state").iterdir()}


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of each line of the text table, split on the two-space column gap (the
    RESULT/ERROR cell may hold single spaces; the first cell, STARTED, holds one)."""
    header, *lines = stdout.splitlines()
    assert header.split() == [
        "STARTED",
        "JOB",
        "RUN",
        "CAUSE",
        "OUTCOME",
        "TOOK",
        *(["TRIES"] if "TRIES" in header else []),
        "RESULT/ERROR",
    ]
    return [[c.strip() for c in line.split("  ") if c.strip()] for line in lines]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """A daemon that ran both jobs a few times and then stopped cleanly."""
    d = DaemonProc(tmp_path_factory.mktemp("hist"), JOBS, PLUGINS, None)
    try:
        d.start()
        d.wait_for("run", job="big", outcome="succeeded", count=3, timeout=5)
        d.wait_for("run", job="fail", outcome="failed", count=3, timeout=5)
        assert d.stop() == 0
        yield d
    finally:
        d.kill()


class TestWhileRunning:
    """A running daemon's history is read beside it, and reads the same after it stops."""

    def test_text_and_json_while_running_then_after_stop(
        self, daemon_factory: Callable[..., DaemonProc]
    ) -> None:
        d = daemon_factory(JOBS, PLUGINS).start()
        d.wait_for("run", job="big", outcome="succeeded", count=2, timeout=5)
        d.wait_for("run", job="fail", outcome="failed", count=2, timeout=5)

        text = history(d)
        assert text.returncode == 0, text.stderr
        assert text.stderr == ""
        lines = text.stdout.splitlines()
        assert all(fmt.text_width(line) <= int(WIDTH) for line in lines), text.stdout
        rows = table_rows(text.stdout)
        assert {r[1] for r in rows} == {"big", "fail"}
        big = next(r for r in rows if r[1] == "big" and r[4] == "succeeded")
        assert big[3] == "schedule"
        assert big[-1].startswith('{"blob": "xxx')  # abbreviated, keys first
        assert big[-1].endswith('"size": 5000, "job": "big"}')
        fail = next(r for r in rows if r[1] == "fail" and r[4] == "failed")
        assert fail[-1] == "RuntimeError: disk on fire second line"  # one line

        running = history_json(d)
        assert running, "no runs while the daemon runs"
        starts = [r["started"] for r in running]
        assert starts == sorted(starts)  # oldest first: the newest at the bottom
        done = [r for r in running if r["job"] == "big" and r["outcome"] == "succeeded"]
        assert done[0]["result"] == {"blob": "x" * 5000, "size": 5000, "job": "big"}
        assert done[0]["result_truncated"] is False

        assert d.stop() == 0
        after = {r["run_id"]: r for r in history_json(d, "-n", "1000")}
        for row in running:
            if row["outcome"] != "running":  # finished rows read the same from the stopped state
                assert after[row["run_id"]] == row
        # A clean stop lets the runs in flight finish: none is left running or interrupted.
        assert {r["outcome"] for r in after.values()} == {"succeeded", "failed"}

    def test_killed_daemon(self, daemon_factory: Callable[..., DaemonProc]) -> None:
        d = daemon_factory(
            '[jobs.long]\ntype = "sleepy"\non = "startup"\n'
            '[jobs.big]\ntype = "big"\non = "startup"\noptions = { size = 10 }\n',
            PLUGINS,
        ).start()
        d.wait_for("run", job="big", outcome="succeeded", timeout=5)
        # Both on record in the database (a run's line is logged just before its commit).
        poll(lambda: d.history("long") and d.history("big")[0]["outcome"] == "succeeded")
        os.killpg(d.pid, signal.SIGKILL)
        d.wait_exit()
        before = state_files(d)
        rows = history_json(d)
        by_job = {r["job"]: r for r in rows}
        assert by_job["big"]["result"] == {"blob": "x" * 10, "size": 10, "job": "big"}, (
            rows,
            before,
            [r for r in d.raw if '"big"' in r][-5:],
        )
        # It was running when the daemon died; the next start will record it so.
        assert by_job["long"]["outcome"] == "interrupted"
        assert by_job["long"]["error"] == "the daemon stopped during this run"
        assert [r["job"] for r in history_json(d, "--failed")] == ["long"]
        after = state_files(d)
        # The -wal the daemon left is read, not folded in. (The -shm, SQLite's index of the
        # -wal and no data, may be rebuilt by the first reader after a crash.)
        for name in ("state.db", "state.db-wal"):
            assert after[name] == before[name]


class TestStopped:
    """A stopped daemon's state_dir: filters, counts, and the full rows."""

    def test_json_has_the_whole_result(self, stopped: DaemonProc) -> None:
        rows = history_json(stopped, "big", "-n", "2")
        assert len(rows) == 2
        for row in rows:
            assert row["result"] == {"blob": "x" * 5000, "size": 5000, "job": "big"}
            assert row["started_at"] == datetime.fromtimestamp(row["started"], UTC).isoformat()
            assert row["scheduled_at"].endswith("+00:00")
            assert row["late"] == pytest.approx(row["started"] - row["scheduled"])
            assert row["cause"] == "schedule"
            assert row["duration"] >= 0

    def test_reading_changes_nothing(self, stopped: DaemonProc) -> None:
        before = state_files(stopped)
        assert "state.db-wal" not in before  # a clean stop folds the WAL in
        history_json(stopped)
        assert history(stopped).returncode == 0
        assert state_files(stopped) == before

    def test_failed(self, stopped: DaemonProc) -> None:
        rows = history_json(stopped, "--failed", "-n", "1000")
        assert len(rows) >= 3
        assert {r["job"] for r in rows} == {"fail"}
        assert {r["outcome"] for r in rows} == {"failed"}
        assert rows[0]["error"] == "RuntimeError: disk on fire\nsecond line"  # whole, in JSON

    def test_n_keeps_the_newest(self, stopped: DaemonProc) -> None:
        everything = history_json(stopped, "-n", "1000")
        assert history_json(stopped, "-n", "3") == everything[-3:]
        text = history(stopped, "-n", "3")
        assert [r[2] for r in table_rows(text.stdout)] == [r["run_id"] for r in everything[-3:]]

    def test_default_is_twenty(self, stopped: DaemonProc) -> None:
        assert len(history_json(stopped)) == min(20, len(history_json(stopped, "-n", "1000")))

    def test_job(self, stopped: DaemonProc) -> None:
        rows = history_json(stopped, "fail", "-n", "1000")
        assert len(rows) >= 3
        assert {r["job"] for r in rows} == {"fail"}

    def test_since(self, stopped: DaemonProc) -> None:
        everything = history_json(stopped, "-n", "1000")
        # Both jobs tick together every 150ms: cut between two ticks, well clear of any run
        # (ISO text keeps only microseconds).
        ticks = [
            i
            for i in range(1, len(everything))
            if everything[i]["started"] - everything[i - 1]["started"] > 0.05
        ]
        half = ticks[len(ticks) // 2]
        cut = (everything[half - 1]["started"] + everything[half]["started"]) / 2
        since = datetime.fromtimestamp(cut, UTC).isoformat()
        rows = history_json(stopped, "--since", since, "-n", "1000")
        assert rows == everything[half:]
        assert 0 < len(rows) < len(everything)
        assert history_json(stopped, "--since", "1h", "-n", "1000") == everything
        future = history(stopped, "--since", "2099-01-01")
        assert (future.returncode, future.stdout) == (0, "no runs since 2099-01-01 00:00:00\n")

    def test_bad_since_is_a_usage_error(self, stopped: DaemonProc) -> None:
        result = history(stopped, "--since", "5 parsecs")
        assert result.returncode == 2
        assert "argument --since: cannot read '5 parsecs' as a time" in result.stderr
        assert result.stdout == ""

    @pytest.mark.parametrize("n", ["0", "-1"])
    def test_bad_count(self, stopped: DaemonProc, n: str) -> None:
        result = history(stopped, "-n", n)
        assert result.returncode == 2
        assert "-n must be from 1 to" in result.stderr

    def test_job_known_but_never_run(self, stopped: DaemonProc) -> None:
        result = history(stopped, "later")
        assert (result.returncode, result.stdout) == (0, "no runs of 'later'\n")
        assert history_json(stopped, "later") == []

    def test_unknown_job(self, stopped: DaemonProc) -> None:
        result = history(stopped, "bigg")
        assert result.returncode == 1
        assert result.stderr == (
            f"taskd: no job 'bigg' in {stopped.config_path}; did you mean 'big'?\n"
        )
        assert result.stdout == ""

    def test_config_made_invalid_after_the_stop(self, stopped: DaemonProc) -> None:
        bad = stopped.dir / "bad.toml"
        bad.write_text(
            stopped.config_path.read_text().replace("[jobs.big]", "[jobs.big]\ntimout = 1")
        )
        result = run_cli("history", "--json", "-c", str(bad))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == history_json(stopped)
        assert f"taskd: warning: {bad} has 1 error (see `taskd check`)" in result.stderr
        # With no valid config, a job name cannot be checked: no runs is just that.
        unknown = run_cli("history", "bigg", "-c", str(bad))
        assert (unknown.returncode, unknown.stdout) == (0, "no runs of 'bigg'\n")

    def test_state_dir_copied_elsewhere(self, stopped: DaemonProc, tmp_path: Path) -> None:
        copy = tmp_path / "copy"
        shutil.copytree(stopped.dir / "state", copy)
        missing = tmp_path / "no-config.toml"
        result = run_cli("history", "--json", "--state-dir", str(copy), "-c", str(missing))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == history_json(stopped)
        assert sorted(p.name for p in copy.iterdir()) == sorted(
            p.name for p in (stopped.dir / "state").iterdir()
        )

    def test_no_database(self, stopped: DaemonProc, tmp_path: Path) -> None:
        cfg = tmp_path / "taskd.toml"
        cfg.write_text('[daemon]\nstate_dir = "nothing-here"\n')
        result = run_cli("history", "-c", str(cfg))
        assert result.returncode == 1
        assert result.stderr == (
            f"taskd: no state database at {tmp_path / 'nothing-here' / 'state.db'}: has taskd "
            f"run with this state_dir? (state_dir comes from {cfg})\n"
        )
        assert not (tmp_path / "nothing-here").exists()
