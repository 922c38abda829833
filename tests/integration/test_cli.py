"""The ``taskd`` command as a user runs it: real subprocesses, real files, exit codes and
output (stdout for results, stderr for errors)."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from taskd._version import __version__
from taskd.state.store import StateStore
from tests.helpers import run_cli

PLUGIN = '''
import asyncio
import multiprocessing
import threading
from pathlib import Path

import taskd


async def hello(ctx, who: str = "world") -> dict:
    """Say hello to someone."""
    return {"hello": who, "job": ctx.job}


def off_loop(n: int = 1) -> dict:
    return {"n": n, "off_main_thread": threading.current_thread() is not threading.main_thread()}


def crunch(n: int = 10) -> dict:
    return {"sum": sum(range(n)), "in_worker_process": multiprocessing.parent_process() is not None}


def boom(msg: str = "kaboom") -> None:
    raise RuntimeError(msg)


async def sleepy(ctx, seconds: float = 30.0) -> None:
    await asyncio.sleep(seconds)


def pathy(where: Path) -> str:
    return type(where).__name__


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("hello", hello),
        taskd.JobType("off_loop", off_loop, kind="blocking"),
        taskd.JobType("crunch", crunch, kind="cpu"),
        taskd.JobType("boom", boom, kind="blocking"),
        taskd.JobType("sleepy", sleepy),
        taskd.JobType("pathy", pathy, kind="blocking"),
    ]
'''

DAEMON = """
[daemon]
plugin_dirs = ["plugins.d"]
state_dir = "state"
runtime_dir = "run"
entry_points = false
process_workers = 1
"""

JOBS = """
[jobs.greet]
type = "hello"
every = "90s"
jitter = "2s"
[jobs.greet.options]
who = "taskd"

[jobs.noon]
type = "off_loop"
cron = "0 12 * * *"
timezone = "Asia/Kolkata"

[jobs.berlin]
type = "off_loop"
cron = "30 2 * * *"
timezone = "Europe/Berlin"

[jobs.crunch]
type = "crunch"
on = "startup"
options = { n = 1000 }

[jobs.fail]
type = "boom"
every = "1h"

[jobs.flaky]
type = "boom"
every = "1h"
retries = 2
retry_backoff = "10ms"

[jobs.sleepy]
type = "sleepy"
every = "1h"
timeout = "200ms"

[jobs.paused]
type = "hello"
every = "1h"
enabled = false

[jobs.future]
type = "hello"
at = 2099-01-01T00:00:00Z

[jobs.past]
type = "hello"
at = 2001-01-01T00:00:00Z

[jobs.pathy]
type = "pathy"
on = "startup"
options = { where = "/tmp" }
"""

BAD = """
[daemon]
plugin_dirs = ["plugins.d"]
log_levle = "debug"
entry_points = false

[jobs.backup]
type = "off_loop"
every = "5x"
timout = "10s"
overlap = "skp"
"""

BROKEN_PLUGIN = "import taskd\nimport no_such_driver_for_taskd_tests\n"


class Project:
    """A folder with a config and a plugins.d, as an operator would lay it out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.plugins = root / "plugins.d"
        self.plugins.mkdir(parents=True, exist_ok=True)
        self.config = root / "taskd.toml"

    def write(self, text: str, name: str = "taskd.toml") -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    def plugin(self, name: str, source: str) -> Path:
        path = self.plugins / name
        path.write_text(textwrap.dedent(source))
        return path


@pytest.fixture
def project(tmp_path: Path) -> Project:
    p = Project(tmp_path / "proj")
    p.plugin("jobs.py", PLUGIN)
    p.write(DAEMON + JOBS)
    return p


def no_traceback(*outputs: str) -> None:
    for text in outputs:
        assert "Traceback" not in text, text


class TestBasics:
    """Version, usage errors and the config path (flag, TASKD_CONFIG, default)."""

    def test_version(self) -> None:
        result = run_cli("--version")
        assert result.returncode == 0
        assert result.stdout.strip() == f"taskd {__version__}"

    def test_no_command_is_a_usage_error(self) -> None:
        result = run_cli()
        assert result.returncode == 2
        assert "usage: taskd" in result.stderr
        for command in ("run", "check", "plugins", "next", "exec"):
            assert command in result.stderr
        assert result.stdout == ""

    def test_unknown_command(self) -> None:
        result = run_cli("frobnicate")
        assert result.returncode == 2
        assert "invalid choice" in result.stderr

    def test_taskd_config_env(self, project: Project) -> None:
        result = run_cli("check", env={"TASKD_CONFIG": str(project.config)})
        assert result.returncode == 0, result.stderr
        assert str(project.config) in result.stdout

    def test_flag_beats_env(self, project: Project, tmp_path: Path) -> None:
        missing = tmp_path / "missing.toml"
        result = run_cli("check", "-c", str(project.config), env={"TASKD_CONFIG": str(missing)})
        assert result.returncode == 0, result.stderr
        result = run_cli("check", "-c", str(missing), env={"TASKD_CONFIG": str(project.config)})
        assert result.returncode == 1

    @pytest.mark.parametrize("command", ["check", "next greet", "exec greet", "run", "plugins"])
    def test_missing_config_file(self, tmp_path: Path, command: str) -> None:
        missing = tmp_path / "nowhere" / "taskd.toml"
        result = run_cli(*command.split(), "-c", str(missing))
        # `run` says EX_CONFIG (78) so systemd does not restart it; the others say 1.
        assert result.returncode == (78 if command == "run" else 1)
        assert str(missing) in result.stderr
        assert "not found" in result.stderr
        no_traceback(result.stdout, result.stderr)

    def test_missing_config_from_env(self, tmp_path: Path) -> None:
        missing = tmp_path / "env.toml"
        result = run_cli("check", env={"TASKD_CONFIG": str(missing)})
        assert result.returncode == 1
        assert str(missing) in result.stderr


class TestCheck:
    """``taskd check`` validates config and plugins like ``nginx -t``."""

    def test_good(self, project: Project) -> None:
        result = run_cli("check", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        line, *warnings = result.stdout.strip().splitlines()
        assert all(w.startswith("  warning: ") for w in warnings)
        assert line.startswith(f"taskd: {project.config}: OK: 11 jobs (")
        assert "1 cpu" in line
        assert "5 io" in line
        assert "5 blocking" in line
        assert "1 disabled" in line
        assert "6 job types" in line

    def test_bad_lists_every_error(self, project: Project) -> None:
        bad = project.write(BAD, "bad.toml")
        result = run_cli("check", "-c", str(bad))
        assert result.returncode == 1
        assert result.stdout == ""
        err = result.stderr
        assert "4 errors" in err
        assert f"{bad}:3: daemon.log_levle: unknown key 'log_levle'" in err
        assert "did you mean 'log_level'?" in err
        assert f"{bad}:8: jobs.backup.every: cannot read '5x' as a duration" in err
        assert f"{bad}:9: jobs.backup.timout: unknown key 'timout'" in err
        assert "did you mean 'timeout'?" in err
        assert f"{bad}:10: jobs.backup.overlap:" in err
        assert "did you mean 'skip'?" in err
        no_traceback(result.stdout, err)

    def test_bad_json(self, project: Project) -> None:
        bad = project.write(BAD, "bad.toml")
        result = run_cli("check", "--json", "-c", str(bad))
        assert result.returncode == 1
        data = json.loads(result.stdout)
        assert data["ok"] is False
        assert len(data["errors"]) == 4
        assert any("jobs.backup.timout" in e and "timeout" in e for e in data["errors"])

    def test_good_json(self, project: Project) -> None:
        result = run_cli("check", "--json", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data == {
            "ok": True,
            "errors": [],
            "jobs": 11,
            "kinds": {"io": 5, "blocking": 5, "cpu": 1},
            "plugins": 1,
        }

    def test_fleet(self, project: Project) -> None:
        fleet = '[fleet]\ndsn = "postgresql://taskd@db.internal:5433/taskd?sslmode=require"\n'
        shared = '\n[jobs.shared]\ntype = "hello"\nevery = "1m"\nscope = "fleet"\n'
        config = project.write(DAEMON + fleet + 'node = "web-3"\n' + JOBS + shared, "fleet.toml")
        result = run_cli("check", "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert (
            "taskd: fleet: node 'web-3', 1 fleet job, database "
            "postgresql://taskd@db.internal:5433/taskd (not contacted by check)\n"
        ) in result.stdout
        result = run_cli("check", "--json", "-c", str(config))
        assert json.loads(result.stdout)["fleet"] == {
            "node": "web-3",
            "database": "postgresql://taskd@db.internal:5433/taskd",
            "jobs": 1,
            "lease": 30.0,
            "sweep": 5.0,
        }

    def test_options_and_type_errors(self, project: Project) -> None:
        path = project.write(
            DAEMON
            + """
            [jobs.a]
            type = "helo"
            every = "1m"
            [jobs.b]
            type = "hello"
            every = "1m"
            options = { who = 5, whom = "x" }
            """,
            "opts.toml",
        )
        result = run_cli("check", "-c", str(path))
        assert result.returncode == 1
        assert "jobs.a.type: unknown job type 'helo'" in result.stderr
        assert "did you mean 'hello'?" in result.stderr
        assert "jobs.b.options.who: expected a string, got an integer" in result.stderr
        assert "jobs.b.options.whom: unknown option 'whom'" in result.stderr

    @pytest.mark.parametrize(
        ("content", "fragment"),
        [
            (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),
            (b"\x00\x01\x02\x03" * 100, "NUL bytes"),
            (b"a = " + b"[" * 100_000, "nested deeper than the TOML parser follows"),
            (b"[daemon\nlog_level = 1\n", "not valid TOML"),
        ],
    )
    def test_not_toml(self, project: Project, content: bytes, fragment: str) -> None:
        path = project.root / "junk.toml"
        path.write_bytes(content)
        result = run_cli("check", "-c", str(path))
        assert result.returncode == 1
        assert str(path) in result.stderr
        assert fragment in result.stderr
        no_traceback(result.stdout, result.stderr)

    def test_directory_as_config(self, project: Project) -> None:
        result = run_cli("check", "-c", str(project.root))
        assert result.returncode == 1
        assert "is a directory" in result.stderr
        no_traceback(result.stderr)

    def test_broken_plugin_fails_check(self, project: Project) -> None:
        broken = project.plugin("sqlthing.py", BROKEN_PLUGIN)
        result = run_cli("check", "-c", str(project.config))
        assert result.returncode == 1
        assert str(broken) in result.stderr
        assert "plugin 'sqlthing' is broken" in result.stderr
        assert "no_such_driver_for_taskd_tests" in result.stderr
        no_traceback(result.stdout, result.stderr)

    def test_broken_plugin_names_the_jobs_it_breaks(self, project: Project) -> None:
        project.plugin("sqlthing.py", BROKEN_PLUGIN)
        path = project.write(
            DAEMON + '[jobs.report]\ntype = "sql_query"\nevery = "1h"\n', "uses.toml"
        )
        result = run_cli("check", "-c", str(path))
        assert result.returncode == 1
        assert "sqlthing" in result.stderr
        assert "report" in result.stderr  # the job that cannot run is named, not dropped

    def test_missing_plugin_folder(self, project: Project) -> None:
        path = project.write(DAEMON.replace('["plugins.d"]', '["plugins.d", "gone.d"]') + JOBS)
        result = run_cli("check", "-c", str(path))
        assert result.returncode == 1
        assert f"{project.root / 'gone.d'}: plugin folder does not exist" in result.stderr


class TestPlugins:
    """``taskd plugins`` lists each plugin, where it came from, its job types, and breakage."""

    def test_list(self, project: Project) -> None:
        broken = project.plugin("sqlthing.py", BROKEN_PLUGIN)
        result = run_cli("plugins", "-c", str(project.config))
        assert result.returncode == 1  # something is broken
        out = result.stdout
        assert f"jobs  [file, ok]  {project.plugins / 'jobs.py'}" in out
        assert "    hello (io): Say hello to someone." in out
        assert "    off_loop (blocking)" in out
        assert "    crunch (cpu)" in out
        assert f"sqlthing  [file, BROKEN]  {broken}" in out
        assert "error: import failed: ModuleNotFoundError" in out
        no_traceback(out, result.stderr)

    def test_verbose_shows_options_and_traceback(self, project: Project) -> None:
        broken = project.plugin("sqlthing.py", BROKEN_PLUGIN)
        result = run_cli("plugins", "-v", "-c", str(project.config))
        out = result.stdout
        assert "Traceback (most recent call last)" in out
        assert f'File "{broken}", line 2' in out
        assert "who: str (default 'world')" in out
        assert "where: Path (required)" in out
        assert "seconds: float (default 30.0)" in out

    def test_all_ok_exits_zero(self, project: Project) -> None:
        result = run_cli("plugins", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        assert "BROKEN" not in result.stdout

    def test_json(self, project: Project) -> None:
        broken = project.plugin("sqlthing.py", BROKEN_PLUGIN)
        result = run_cli("plugins", "--json", "-c", str(project.config))
        data = json.loads(result.stdout)
        rows = {row["name"]: row for row in data["plugins"]}
        assert set(rows) == {"jobs", "sqlthing"}
        jobs = rows["jobs"]
        assert (jobs["source"], jobs["origin"], jobs["broken"]) == (
            "file",
            str(project.plugins / "jobs.py"),
            None,
        )
        types = {t["name"]: t for t in jobs["job_types"]}
        assert {n: t["kind"] for n, t in types.items()} == {
            "hello": "io",
            "off_loop": "blocking",
            "crunch": "cpu",
            "boom": "blocking",
            "sleepy": "io",
            "pathy": "blocking",
        }
        assert types["hello"]["options"] == [
            {"name": "who", "type": "str", "required": False, "default": "'world'"}
        ]
        assert rows["sqlthing"]["origin"] == str(broken)
        assert "ModuleNotFoundError" in rows["sqlthing"]["broken"]
        assert "Traceback" in rows["sqlthing"]["traceback"]
        assert data["conflicts"] == {}
        assert data["folder_problems"] == []

    def test_extra_plugin_dir(self, project: Project, tmp_path: Path) -> None:
        extra = tmp_path / "extra.d"
        extra.mkdir()
        (extra / "more.py").write_text(
            "import taskd\ndef f() -> None: ...\n"
            "@taskd.hookimpl\ndef taskd_job_types():\n"
            "    return [taskd.JobType('more_f', f, kind='blocking')]\n"
        )
        result = run_cli("plugins", "-c", str(project.config), "--plugin-dir", str(extra))
        assert result.returncode == 0, result.stderr
        assert f"more  [file, ok]  {extra / 'more.py'}" in result.stdout
        assert "more_f (blocking)" in result.stdout

    def test_conflict_is_listed_not_a_crash(self, project: Project) -> None:
        project.plugin("copy.py", PLUGIN)
        result = run_cli("plugins", "-c", str(project.config))
        no_traceback(result.stdout, result.stderr)
        assert "conflict: job type 'hello' is provided by both" in result.stdout

    def test_conflict_json(self, project: Project) -> None:
        project.plugin("copy.py", PLUGIN)
        result = run_cli("plugins", "--json", "-c", str(project.config))
        no_traceback(result.stderr)
        data = json.loads(result.stdout)
        assert "hello" in data["conflicts"]

    def test_invalid_config(self, project: Project) -> None:
        bad = project.write(BAD, "bad.toml")
        result = run_cli("plugins", "-c", str(bad))
        assert result.returncode == 1
        assert "log_levle" in result.stderr


def _times(result_stdout: str) -> list[tuple[datetime, datetime]]:
    """(local, utc) pairs from ``taskd next`` text lines."""
    pairs = []
    for line in result_stdout.splitlines()[1:]:
        m = re.fullmatch(r"  (\S+ \S+)  \((\S+ \S+) UTC\)", line)
        if m:
            local = datetime.fromisoformat(m.group(1))
            utc = datetime.fromisoformat(m.group(2)).replace(tzinfo=UTC)
            pairs.append((local, utc))
    return pairs


class TestReaderGone:
    """``taskd next JOB -n 100000 | head -1``: the reader leaves early; taskd ends quietly."""

    @pytest.mark.parametrize("json_out", [False, True])
    def test_a_closed_pipe_is_no_traceback(self, project: Project, json_out: bool) -> None:
        argv = [sys.executable, "-m", "taskd", "next", "greet", "-n", "100000"]
        argv += ["--json"] if json_out else []
        proc = subprocess.Popen(
            [*argv, "-c", str(project.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()  # one line, then the reader goes, as head does
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.wait(timeout=60) == 141, err
        assert err == ""


class TestNext:
    """``taskd next`` shows upcoming times from the config alone, no daemon needed."""

    def test_every_is_anchored(self, project: Project) -> None:
        before = datetime.now(UTC)
        result = run_cli("next", "greet", "-n", "5", "--json", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["job"] == "greet"
        assert data["schedule"] == "every 1m30s"
        assert data["enabled"] is True
        times = [datetime.fromisoformat(t) for t in data["next"]]
        assert len(times) == 5
        epochs = [t.timestamp() for t in times]
        assert all(e % 90 == 0 for e in epochs)
        assert [b - a for a, b in itertools.pairwise(epochs)] == [90.0] * 4
        assert before < times[0] <= before + timedelta(seconds=95)

    def test_every_text(self, project: Project) -> None:
        result = run_cli("next", "greet", "-n", "5", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "greet: every 1m30s"
        pairs = _times(result.stdout)
        assert len(pairs) == 5
        assert all(local == utc for local, utc in pairs)
        assert all(utc.timestamp() % 90 == 0 for _, utc in pairs)
        assert lines[-1] == "  plus up to 2s of random jitter each"

    def test_default_count_is_ten(self, project: Project) -> None:
        result = run_cli("next", "greet", "-c", str(project.config))
        assert len(_times(result.stdout)) == 10

    def test_cron_in_a_zone_shows_local_times_with_offsets(self, project: Project) -> None:
        result = run_cli("next", "noon", "-n", "3", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == "noon: cron '0 12 * * *' Asia/Kolkata"
        pairs = _times(result.stdout)
        assert len(pairs) == 3
        for local, utc in pairs:
            assert local.isoformat().endswith("T12:00:00+05:30")
            assert (utc.hour, utc.minute) == (6, 30)
            assert local == utc
        assert [b[1] - a[1] for a, b in itertools.pairwise(pairs)] == [timedelta(days=1)] * 2

    def test_cron_across_dst_offsets_agree(self, project: Project) -> None:
        result = run_cli("next", "berlin", "-n", "3", "-c", str(project.config))
        pairs = _times(result.stdout)
        assert len(pairs) == 3
        for local, utc in pairs:
            assert (local.hour, local.minute) == (2, 30) or (local.hour, local.minute) == (3, 0)
            assert local.utcoffset() in (timedelta(hours=1), timedelta(hours=2))
            assert local == utc

    def test_cron_json_is_utc(self, project: Project) -> None:
        result = run_cli("next", "noon", "-n", "2", "--json", "-c", str(project.config))
        data = json.loads(result.stdout)
        assert data["schedule"] == "cron '0 12 * * *' Asia/Kolkata"
        assert [t[10:] for t in data["next"]] == ["T06:30:00+00:00"] * 2

    def test_startup_job(self, project: Project) -> None:
        result = run_cli("next", "crunch", "-c", str(project.config))
        assert result.returncode == 0
        assert result.stdout.splitlines() == [
            "crunch: on startup",
            "  runs once each time the daemon starts",
        ]

    def test_at_in_future_fires_once(self, project: Project) -> None:
        result = run_cli("next", "future", "-n", "5", "--json", "-c", str(project.config))
        assert json.loads(result.stdout)["next"] == ["2099-01-01T00:00:00+00:00"]

    def test_at_in_past(self, project: Project) -> None:
        result = run_cli("next", "past", "-c", str(project.config))
        assert result.returncode == 0
        assert "no upcoming runs" in result.stdout

    def test_disabled_is_said(self, project: Project) -> None:
        result = run_cli("next", "paused", "-n", "1", "-c", str(project.config))
        assert result.stdout.splitlines()[0] == "paused: every 1h (disabled)"

    def test_unknown_job_with_suggestion(self, project: Project) -> None:
        result = run_cli("next", "gret", "-c", str(project.config))
        assert result.returncode == 1
        assert "no job 'gret'" in result.stderr
        assert "did you mean 'greet'?" in result.stderr
        assert result.stdout == ""

    def test_needs_no_plugins(self, project: Project) -> None:
        path = project.write('[jobs.x]\ntype = "not_installed"\nevery = "1h"\n', "noplug.toml")
        result = run_cli("next", "x", "-n", "2", "-c", str(path))
        assert result.returncode == 0, result.stderr
        assert len(_times(result.stdout)) == 2

    @pytest.mark.parametrize("n", ["0", "-3"])
    def test_bad_count(self, project: Project, n: str) -> None:
        result = run_cli("next", "greet", "-n", n, "-c", str(project.config))
        assert result.returncode == 2
        assert "-n must be from 1 to" in result.stderr


class TestExec:
    """``taskd exec JOB`` runs one job once in the foreground and prints its result."""

    def test_io_job(self, project: Project) -> None:
        result = run_cli("exec", "greet", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"hello": "taskd", "job": "greet"}

    def test_blocking_job_runs_off_the_loop_thread(self, project: Project) -> None:
        result = run_cli("exec", "noon", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"n": 1, "off_main_thread": True}

    def test_cpu_job_from_a_dropin_runs_in_a_worker_process(self, project: Project) -> None:
        result = run_cli("exec", "crunch", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"sum": 499500, "in_worker_process": True}

    def test_failing_job(self, project: Project) -> None:
        result = run_cli("exec", "fail", "-c", str(project.config))
        assert result.returncode == 1
        assert "taskd: job 'fail' failed: RuntimeError: kaboom" in result.stderr
        assert result.stdout == ""

    def test_timeout(self, project: Project) -> None:
        result = run_cli("exec", "sleepy", "--json", "-c", str(project.config))
        assert result.returncode == 1
        data = json.loads(result.stdout)
        assert data["outcome"] == "timed_out"
        assert "timed out after 0.2s" in data["error"]

    def test_json(self, project: Project) -> None:
        result = run_cli("exec", "greet", "--json", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["job"] == "greet"
        assert data["outcome"] == "succeeded"
        assert data["attempts"] == 1
        assert data["error"] is None
        assert data["result"] == {"hello": "taskd", "job": "greet"}
        assert isinstance(data["run_id"], str)
        assert data["run_id"]

    def test_retries_and_no_retries(self, project: Project) -> None:
        result = run_cli("exec", "flaky", "--json", "-c", str(project.config))
        data = json.loads(result.stdout)
        assert (result.returncode, data["outcome"], data["attempts"]) == (1, "failed", 3)
        assert data["error"] == "RuntimeError: kaboom"
        result = run_cli("exec", "flaky", "--json", "--no-retries", "-c", str(project.config))
        assert json.loads(result.stdout)["attempts"] == 1

    def test_disabled_job_can_still_be_tried(self, project: Project) -> None:
        result = run_cli("exec", "paused", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["job"] == "paused"

    def test_path_option_arrives_as_a_path(self, project: Project) -> None:
        result = run_cli("exec", "pathy", "-c", str(project.config))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == "PosixPath"

    def test_unknown_job(self, project: Project) -> None:
        result = run_cli("exec", "gret", "-c", str(project.config))
        assert result.returncode == 1
        assert "no job 'gret'" in result.stderr
        assert "did you mean 'greet'?" in result.stderr

    def test_broken_job(self, project: Project) -> None:
        project.plugin("sqlthing.py", BROKEN_PLUGIN)
        path = project.write(
            DAEMON + '[jobs.report]\ntype = "sql_query"\nevery = "1h"\n', "uses.toml"
        )
        result = run_cli("exec", "report", "-c", str(path))
        assert result.returncode == 1
        assert "taskd: job 'report' is broken" in result.stderr
        assert "sqlthing.py" in result.stderr

    def test_invalid_config(self, project: Project) -> None:
        bad = project.write(BAD, "bad.toml")
        result = run_cli("exec", "backup", "-c", str(bad))
        assert result.returncode == 1
        assert "4 errors" in result.stderr
        no_traceback(result.stderr)

    def test_writes_no_history(self, project: Project) -> None:
        # exec runs with no state store: the daemon's history and schedule are left alone.
        state = project.root / "state"
        run_cli("exec", "greet", "-c", str(project.config))
        assert not state.exists()
        store = StateStore(state / "state.db")
        store.open()
        store.close()
        for job in ("greet", "fail"):
            run_cli("exec", job, "-c", str(project.config))
        db = sqlite3.connect(state / "state.db")
        try:
            assert db.execute("SELECT count(*) FROM runs").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        finally:
            db.close()


class TestCheckWarnings:
    """`taskd check` passes a past `at`, but says it will not run."""

    def test_at_in_the_past(self, tmp_path: Path) -> None:
        (tmp_path / "plugins.d").mkdir()
        (tmp_path / "plugins.d" / "p.py").write_text(
            "import taskd\n"
            "async def noop(ctx) -> None: ...\n"
            "@taskd.hookimpl\n"
            "def taskd_job_types():\n"
            "    return [taskd.JobType('noop', noop)]\n"
        )
        (tmp_path / "taskd.toml").write_text(
            '[daemon]\nplugin_dirs = ["plugins.d"]\nentry_points = false\n'
            '[jobs.old]\ntype = "noop"\nat = 2020-01-01T00:00:00Z\n'
            '[jobs.new]\ntype = "noop"\nat = 2099-01-01T00:00:00Z\n'
        )
        result = run_cli("check", "-c", str(tmp_path / "taskd.toml"))
        assert result.returncode == 0, result.stderr
        assert "warning: jobs.old.at = 2020-01-01T00:00:00+00:00 is in the past" in result.stdout
        assert "jobs.new" not in result.stdout
