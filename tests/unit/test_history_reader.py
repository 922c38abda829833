"""Reading the run history from outside the daemon (taskd.state.history), and ``--since``."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from taskd.cli.history import MIN_DETAIL, render
from taskd.cli.history_args import parse_since
from taskd.errors import StateError
from taskd.state.history import NoStateDatabase, daemon_running, is_truncated, read_history
from taskd.state.lock import InstanceLock
from taskd.state.store import MAX_RUN_RESULT_CHARS, StateStore
from tests.helpers import REPO

T0 = 1_796_220_000.0


def add_runs(store: StateStore, runs: list[dict[str, Any]]) -> None:
    """Record finished runs as the daemon does: started, then finished."""
    for i, r in enumerate(runs):
        started = r.get("started", T0 + 60 * i)
        scheduled = r.get("scheduled", started)
        cause = r.get("cause", "schedule")
        store.run_started(r["id"], r["job"], scheduled, started, cause)
        if r.get("outcome", "succeeded") == "running":
            continue
        store.run_finished(
            r["id"],
            r["job"],
            scheduled,
            started,
            r.get("attempts", 1),
            r.get("duration", 0.5),
            r.get("outcome", "succeeded"),
            r.get("error"),
            cause,
            result_json=json.dumps(r["result"]) if "result" in r else None,
            failures=0,
        )
    store.flush()


@pytest.fixture
def make_db(tmp_path: Path) -> Callable[..., Path]:
    """``make_db(runs)`` -> the path of a closed state database holding those runs."""

    def make(runs: list[dict[str, Any]], name: str = "state") -> Path:
        path = tmp_path / name / "state.db"
        store = StateStore(path)
        store.open()
        try:
            add_runs(store, runs)
        finally:
            store.close()
        return path

    return make


RUNS = [
    {"id": "r1", "job": "backup", "result": {"files": 3}, "duration": 1.5},
    {"id": "r2", "job": "check", "outcome": "failed", "error": "RuntimeError: down", "attempts": 3},
    {"id": "r3", "job": "backup", "outcome": "timed_out", "error": "timed out after 10s"},
    {"id": "r4", "job": "check", "result": [1, 2], "cause": "manual", "scheduled": T0 + 170},
    {"id": "r5", "job": "backup", "outcome": "cancelled", "error": "cancelled"},
    {"id": "r6", "job": "check", "result": None},
]


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["run_id"] for r in rows]


class TestRead:
    """Filters, order and the shape of each row."""

    def test_newest_first_with_every_field(self, make_db: Callable[..., Path]) -> None:
        rows = read_history(make_db(RUNS), limit=20)
        assert ids(rows) == ["r6", "r5", "r4", "r3", "r2", "r1"]
        r4 = rows[2]
        assert r4 == {
            "run_id": "r4",
            "job": "check",
            "scheduled": T0 + 170,
            "started": T0 + 180,
            "attempts": 1,
            "duration": 0.5,
            "outcome": "succeeded",
            "error": None,
            "cause": "manual",
            "result": [1, 2],
            "late": 10.0,
        }
        assert rows[-1]["result"] == {"files": 3}
        assert rows[-2]["attempts"] == 3

    def test_limit_keeps_the_newest(self, make_db: Callable[..., Path]) -> None:
        assert ids(read_history(make_db(RUNS), limit=2)) == ["r6", "r5"]

    def test_job(self, make_db: Callable[..., Path]) -> None:
        assert ids(read_history(make_db(RUNS), job="backup")) == ["r5", "r3", "r1"]
        assert read_history(make_db(RUNS, "other"), job="nope") == []

    def test_failed_means_every_outcome_but_success(self, make_db: Callable[..., Path]) -> None:
        rows = read_history(make_db(RUNS), failed=True)
        assert ids(rows) == ["r5", "r3", "r2"]
        assert {r["outcome"] for r in rows} == {"cancelled", "timed_out", "failed"}

    def test_since_is_inclusive(self, make_db: Callable[..., Path]) -> None:
        assert ids(read_history(make_db(RUNS), since=T0 + 180)) == ["r6", "r5", "r4"]

    def test_filters_combine(self, make_db: Callable[..., Path]) -> None:
        rows = read_history(make_db(RUNS), job="backup", failed=True, since=T0 + 150, limit=1)
        assert ids(rows) == ["r5"]

    def test_truncated_result(self, make_db: Callable[..., Path]) -> None:
        big = {"blob": "x" * (MAX_RUN_RESULT_CHARS + 100)}
        small = {"blob": "x" * 100}
        rows = read_history(
            make_db(
                [{"id": "b", "job": "j", "result": big}, {"id": "s", "job": "j", "result": small}]
            )
        )
        assert rows[0]["result"] == small
        assert not is_truncated(rows[0]["result"])
        cut = rows[1]["result"]
        assert is_truncated(cut)
        assert cut.startswith('{"blob": "xxx')
        assert len(cut) <= MAX_RUN_RESULT_CHARS + len("...(truncated)")

    def test_unparsable_result_is_kept_as_text(self, make_db: Callable[..., Path]) -> None:
        path = make_db([{"id": "r1", "job": "j", "result": 1}])
        with sqlite3.connect(path) as db:
            db.execute("UPDATE runs SET result = '{not json' WHERE run_id = 'r1'")
        db.close()
        assert read_history(path)[0]["result"] == "{not json"


class TestOddDatabases:
    """Missing, older, newer and foreign files each give a clear answer."""

    def test_missing(self, tmp_path: Path) -> None:
        path = tmp_path / "state" / "state.db"
        with pytest.raises(NoStateDatabase) as info:
            read_history(path)
        assert str(info.value) == f"no state database at {path}: has taskd run with this state_dir?"
        assert isinstance(info.value, StateError)
        assert not path.parent.exists()  # nothing was created looking for it

    def test_schema_1_has_no_results(self, tmp_path: Path) -> None:
        path = tmp_path / "state.db"
        db = sqlite3.connect(path)
        db.executescript(SCHEMA_1)
        db.execute(
            "INSERT INTO runs (run_id, job, scheduled, started, attempts, duration, outcome, "
            "error, trigger) VALUES ('old', 'j', 10.0, 12.5, 2, 1.0, 'failed', 'boom', 'catchup')"
        )
        db.commit()
        db.close()
        before = path.read_bytes()
        (row,) = read_history(path)
        assert row["result"] is None
        assert (row["run_id"], row["outcome"], row["error"], row["cause"], row["late"]) == (
            "old",
            "failed",
            "boom",
            "catchup",
            2.5,
        )
        assert path.read_bytes() == before  # read, not migrated

    def test_newer_schema(self, make_db: Callable[..., Path]) -> None:
        path = make_db([])
        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
        db.close()
        with pytest.raises(StateError, match="has schema 99, newer than this taskd"):
            read_history(path)

    def test_not_a_taskd_database(self, tmp_path: Path) -> None:
        path = tmp_path / "state.db"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE other (x)")
        db.close()
        with pytest.raises(StateError, match="not a taskd state database"):
            read_history(path)

    def test_not_a_database(self, tmp_path: Path) -> None:
        path = tmp_path / "state.db"
        path.write_bytes(b"this is not sqlite at all" * 100)
        with pytest.raises(StateError, match=f"cannot read state database {path}"):
            read_history(path)


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (
    name TEXT PRIMARY KEY,
    last_tick REAL,
    paused INTEGER NOT NULL DEFAULT 0,
    last_run_id TEXT, last_outcome TEXT, last_started REAL, last_duration REAL,
    last_error TEXT, last_result TEXT
);
CREATE TABLE runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    job TEXT NOT NULL,
    scheduled REAL NOT NULL,
    started REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    duration REAL,
    outcome TEXT NOT NULL,
    error TEXT,
    trigger TEXT NOT NULL DEFAULT 'schedule'
);
CREATE INDEX runs_job ON runs (job, seq);
CREATE TABLE shared (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
"""


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


CRASH = """
import json, os, sys
from pathlib import Path
from taskd.state.store import StateStore
store = StateStore(Path(sys.argv[1]))
store.open()
store.run_started("done", "j", 1.0, 1.0, "schedule")
store.run_finished("done", "j", 1.0, 1.0, 1, 0.5, "succeeded", None, "schedule", '{"a": 1}', 0)
store.run_started("mid", "j", 2.0, 2.0, "schedule")
store.flush()
os._exit(0)  # as kill -9: no checkpoint, the commits are in the -wal only
"""


def crashed_state(folder: Path) -> Path:
    """A state_dir as a daemon killed mid-run leaves it: -wal and -shm holding the commits."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", CRASH, str(folder / "state.db")], check=True, cwd=REPO)
    assert (folder / "state.db-wal").stat().st_size > 0
    return folder / "state.db"


class TestReadOnly:
    """The reader never writes: not the database, not its folder, whether a daemon runs or not."""

    def test_stopped_daemon_nothing_changes_nothing_created(
        self, make_db: Callable[..., Path]
    ) -> None:
        path = make_db(RUNS)
        before = snapshot(path.parent)
        assert "state.db-wal" not in before  # a clean stop leaves the database alone
        time.sleep(0.01)  # a write now would show in the mtime
        assert len(read_history(path)) == 6
        assert snapshot(path.parent) == before

    def test_crashed_daemon_commits_in_the_wal_are_read(self, tmp_path: Path) -> None:
        path = crashed_state(tmp_path / "state")
        before = snapshot(path.parent)
        rows = read_history(path)
        assert [(r["run_id"], r["outcome"]) for r in rows] == [
            ("mid", "interrupted"),  # no daemon holds the lock: it died during this run
            ("done", "succeeded"),
        ]
        assert rows[0]["error"] == "the daemon stopped during this run"
        assert rows[1]["result"] == {"a": 1}
        assert ids(read_history(path, failed=True)) == ["mid"]
        after = snapshot(path.parent)
        assert after["state.db"] == before["state.db"]
        assert after["state.db-wal"] == before["state.db-wal"]

    def test_running_daemon(self, tmp_path: Path) -> None:
        lock = InstanceLock(tmp_path)
        lock.acquire()
        store = StateStore(tmp_path / "state.db")
        store.open()
        try:
            assert daemon_running(tmp_path)
            add_runs(
                store, [{"id": "a", "job": "j"}, {"id": "b", "job": "j", "outcome": "running"}]
            )
            rows = read_history(store.path)
            assert [(r["run_id"], r["outcome"]) for r in rows] == [
                ("b", "running"),
                ("a", "succeeded"),
            ]
            assert read_history(store.path, failed=True) == []  # in flight is not failed
            # The daemon goes on writing while a reader has looked.
            add_runs(store, [{"id": "c", "job": "j"}])
            assert ids(read_history(store.path)) == ["c", "b", "a"]
        finally:
            store.close()
            lock.release()
        assert not daemon_running(tmp_path)

    def test_folder_not_writable_by_the_reader(self, tmp_path: Path) -> None:
        """An operator who may read but not write the state_dir (not root, not the daemon's
        user) reads a cleanly stopped daemon's database and a crashed one's."""
        with readable_tree() as root:
            clean = root / "clean" / "state.db"
            store = StateStore(clean)
            store.open()
            add_runs(store, RUNS)
            store.close()
            crashed = crashed_state(root / "crashed")
            for p in root.rglob("*"):
                p.chmod(0o755 if p.is_dir() else 0o644)
            before = {d: snapshot(d) for d in (clean.parent, crashed.parent)}
            out = run_as_other_user(
                "import json, sys\n"
                "from pathlib import Path\n"
                "from taskd.state.history import read_history\n"
                "print(json.dumps([[r['run_id'] for r in read_history(Path(p))] for p in sys.argv[1:]]))\n",
                str(clean),
                str(crashed),
            )
            assert json.loads(out) == [["r6", "r5", "r4", "r3", "r2", "r1"], ["mid", "done"]]
            assert {d: snapshot(d) for d in before} == before


class readable_tree:  # a context manager that reads as a function
    """A temporary folder others can traverse (pytest's tmp_path is 0700), removed after."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="taskd-history-"))
        self.path.chmod(0o755)
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def run_as_other_user(code: str, *args: str) -> str:
    """Run ``code`` as nobody, who may read the files but not write them or their folder
    (via setpriv, so only when the tests run as root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the reader as another user")
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            *args,
        ],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def local(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()  # naive: the local (TZ) time


@pytest.mark.usefixtures("berlin")
class TestSince:
    """``--since``: how long ago, an ISO 8601 date or time, today or yesterday."""

    NOW = 1_796_220_303.0  # 2026-12-02 15:05:03 in Berlin

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("1h", NOW - 3600),
            ("30m", NOW - 1800),
            ("2d", NOW - 2 * 86400),
            ("1h30m", NOW - 5400),
            (" 1h ago ", NOW - 3600),
            ("2026-12-02", "2026-12-02T00:00:00"),
            ("2026-12-02T14:00", "2026-12-02T14:00:00"),
            ("2026-12-02 14:00:30", "2026-12-02T14:00:30"),
            ("2026-12-02T14:00:00Z", 1_796_220_000.0),
            ("2026-12-02T14:00:00+01:00", 1_796_216_400.0),
            ("today", "2026-12-02T00:00:00"),
            ("Yesterday", "2026-12-01T00:00:00"),
        ],
    )
    def test_valid(self, text: str, expected: float | str) -> None:
        # A string is a naive local time, turned into epoch seconds under the test's TZ.
        want = local(expected) if isinstance(expected, str) else expected
        assert parse_since(text, now=self.NOW) == want

    def test_yesterday_across_a_dst_change(self) -> None:
        # 2026-03-29 is 23 hours long in Berlin: "yesterday" from the 30th is its midnight.
        now = local("2026-03-30T12:00:00")
        assert parse_since("yesterday", now=now) == local("2026-03-29T00:00:00")
        assert local("2026-03-30T00:00:00") - local("2026-03-29T00:00:00") == 23 * 3600

    @pytest.mark.parametrize("text", ["", "5x", "90", "yesterdy", "2026-13-01", "1m1h", "-1h"])
    def test_invalid(self, text: str) -> None:
        with pytest.raises(ValueError, match=r"cannot read .* as a time"):
            parse_since(text, now=self.NOW)


def row(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "run_id": "a68ee88506000001",
        "job": "backup",
        "scheduled": T0,
        "started": T0,
        "attempts": 1,
        "duration": 1.25,
        "outcome": "succeeded",
        "error": None,
        "cause": "schedule",
        "result": {"files": 3},
        "late": 0.0,
    }
    return {**base, **kw}


@pytest.mark.usefixtures("berlin")
class TestRender:
    """The text table: local times, TRIES only when it says something, detail by outcome."""

    def test_columns_and_cells(self) -> None:
        out = render(
            [
                row(),
                row(run_id="r2", outcome="failed", error="OSError: full\nmore", result=None),
                row(run_id="r3", outcome="running", duration=None, result=None),
            ],
            width=120,
        )
        assert out.splitlines() == [
            "STARTED              JOB     RUN               CAUSE     OUTCOME    TOOK  RESULT/ERROR",
            '2026-12-02 15:00:00  backup  a68ee88506000001  schedule  succeeded  1.2s  {"files": 3}',
            "2026-12-02 15:00:00  backup  r2                schedule  failed     1.2s  OSError: full more",
            "2026-12-02 15:00:00  backup  r3                schedule  running       -",
        ]

    def test_tries_column_when_a_run_retried(self) -> None:
        out = render([row(), row(run_id="r2", attempts=3)], width=120)
        header, first, second = out.splitlines()
        assert header.split()[-2:] == ["TRIES", "RESULT/ERROR"]
        assert first.split()[-3:] == ["1", '{"files":', "3}"]
        assert second.split()[-3:] == ["3", '{"files":', "3}"]

    def test_fits_the_width(self) -> None:
        rows = [row(result={"blob": "x" * 5000, "n": 1}), row(error="E" * 500, outcome="failed")]
        for width in (100, 120, 200):
            out = render(rows, width=width)
            assert max(len(line) for line in out.splitlines()) == width
        # Never narrower than MIN_DETAIL, even when that overflows a small terminal.
        lines = render(rows, width=40).splitlines()
        assert [len(line.split("  ")[-1]) for line in lines[1:]] == [MIN_DETAIL, MIN_DETAIL]
