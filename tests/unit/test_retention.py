"""History retention in bounded steps: a commit deletes no more than it added (exact at steady
state), a backlog goes in timed passes on the loop, and nothing else waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from taskd.state.retention import FIRST_CHUNK, Retention
from taskd.state.store import StateStore

NOW = 1_000_000.0


def _db(tmp_path: Path, rows: int, running: int = 0) -> sqlite3.Connection:
    """A state.db holding ``rows`` finished runs started 1 s apart up to NOW, the oldest
    ``running`` of them still going."""
    store = StateStore(tmp_path / "state" / "state.db")
    store.open()
    store.close()
    db = sqlite3.connect(tmp_path / "state" / "state.db", isolation_level=None)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO runs (run_id, job, scheduled, started, outcome) VALUES (?, 'j', ?, ?, ?)",
        (
            (f"r{i:06d}", NOW - rows + i, NOW - rows + i, "running" if i < running else "ok")
            for i in range(rows)
        ),
    )
    db.execute("COMMIT")
    return db


def _ids(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT run_id FROM runs ORDER BY seq")]


class TestPrune:
    """One bounded step inside the caller's transaction."""

    def test_deletes_at_most_rows_oldest_first(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 100)
        done = Retention(max_runs=10).prune(db, 100, NOW, 30)
        assert (done.count, done.more) == (70, True)
        assert _ids(db)[0] == "r000030"

    def test_exact_when_the_excess_fits(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 100)
        done = Retention(max_runs=99).prune(db, 100, NOW, 1)
        assert (done.count, done.more) == (99, False)
        assert _ids(db) == [f"r{i:06d}" for i in range(1, 100)]

    def test_nothing_due_deletes_nothing(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 10)
        assert Retention(max_runs=10, max_age=3600).prune(db, 10, NOW, 5).count == 10
        assert len(_ids(db)) == 10

    def test_age_first_and_running_rows_stay(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 100, running=5)
        done = Retention(max_runs=1000, max_age=50.5).prune(db, 100, NOW, 1000)
        # Started more than 50.5 s before NOW: r000000..r000049; the 5 running ones stay.
        assert (done.count, done.more) == (55, False)
        assert _ids(db)[:6] == [f"r{i:06d}" for i in range(5)] + ["r000050"]

    def test_age_then_count_share_the_rows(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 100)
        done = Retention(max_runs=40, max_age=89.5).prune(db, 100, NOW, 20)
        # 10 by age (r000000..r000009), then 10 of the 50 past max_runs.
        assert (done.count, done.more) == (80, True)
        assert _ids(db)[0] == "r000020"


class TestPruneFor:
    """Timed passes: chunks sized from the time a row takes."""

    def test_a_pass_with_no_time_left_deletes_one_chunk(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 1000)
        done = Retention(max_runs=10).prune_for(db, 1000, NOW, seconds=0.0)
        assert (done.count, done.more) == (1000 - FIRST_CHUNK, True)

    def test_a_pass_ends_when_nothing_is_due(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 1000)
        done = Retention(max_runs=10).prune_for(db, 1000, NOW, seconds=60.0)
        assert (done.count, done.more) == (10, False)
        assert _ids(db) == [f"r{i:06d}" for i in range(990, 1000)]


def _fill(store: StateStore, n: int, start: float = NOW, prefix: str = "x") -> None:
    for i in range(n):
        store.run_finished(
            f"{prefix}{i:06d}", "j", start + i, start + i, 1, 0.1, "succeeded", None, "schedule"
        )


class TestStore:
    """What the store does with it: commits exact, backlogs in passes."""

    def test_no_loop_everything_goes_at_open(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 5000)
        db.close()
        store = StateStore(tmp_path / "state" / "state.db", Retention(max_runs=7))
        store.open()  # no running loop: nothing to hold up, all passes run now
        try:
            assert len(store.history(limit=100)) == 7
            assert store.history(limit=1)[0]["run_id"] == "r004999"
        finally:
            store.close()

    async def test_a_burst_commit_stays_exact(self, tmp_path: Path) -> None:
        store = StateStore(tmp_path / "state" / "state.db", Retention(max_runs=100))
        store.open()
        try:
            _fill(store, 100)
            await store.durable()
            _fill(store, 5000, start=NOW + 100, prefix="y")  # one commit, 5,000 past the limit
            await store.durable()
            rows = store.history(limit=1000)
            assert len(rows) == 100 and rows[-1]["run_id"] == "y004900"
            assert not store._writer.backlog.due
        finally:
            store.close()

    async def test_a_lowered_limit_goes_in_passes(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 20_000)
        db.close()
        store = StateStore(tmp_path / "state" / "state.db", Retention(max_runs=1_000_000))
        store.open()
        try:
            with capture_logs() as logs:
                store.retention = Retention(max_runs=5)
                # Not in one go: the setter only schedules passes.
                assert len(store.history(limit=100_000)) == 20_000
                for _ in range(2000):
                    await asyncio.sleep(0.01)
                    if not store._writer.backlog.due:
                        break
            assert [r["run_id"] for r in store.history(limit=100)] == [
                f"r{i:06d}" for i in range(19_999, 19_994, -1)
            ]
            done = [e for e in logs if e["event"] == "history_pruned"]
            assert done and done[0]["deleted"] == 19_995 and done[0]["passes"] > 1
            assert [e["event"] for e in logs].count("history_pruning") == 1
        finally:
            store.close()

    async def test_runs_commit_while_a_backlog_drains(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 20_000)
        db.close()
        store = StateStore(tmp_path / "state" / "state.db", Retention(max_runs=50))
        store.open()  # one pass at open, the rest scheduled
        try:
            assert len(store.history(limit=100_000)) > 50
            _fill(store, 60, start=time.time())
            started = time.monotonic()
            await store.durable()
            assert time.monotonic() - started < 5  # a commit does not wait for the backlog
            for _ in range(2000):
                await asyncio.sleep(0.01)
                if not store._writer.backlog.due:
                    break
            assert [r["run_id"] for r in store.history(limit=100)] == [
                f"x{i:06d}" for i in range(59, 9, -1)
            ]
        finally:
            store.close()

    async def test_close_leaves_the_rest_for_the_next_start(self, tmp_path: Path) -> None:
        db = _db(tmp_path, 50_000)
        db.close()
        path = tmp_path / "state" / "state.db"
        store = StateStore(path, Retention(max_runs=5))
        store.open()
        store.close()
        with contextlib.closing(sqlite3.connect(path)) as db:
            left = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        assert 5 < left < 50_000
        await asyncio.sleep(0.05)  # the cancelled pass does not run on a closed store


@pytest.mark.parametrize("rows", [1, FIRST_CHUNK, 3 * FIRST_CHUNK])
async def test_steady_state_one_commit_at_a_time(tmp_path: Path, rows: int) -> None:
    """Each commit of ``rows`` new runs at the limit deletes exactly as many, at once."""
    store = StateStore(tmp_path / "state" / "state.db", Retention(max_runs=50))
    store.open()
    try:
        for k in range(5):
            _fill(store, rows, start=NOW + 1000 * k, prefix=f"k{k}-")
            await store.durable()  # one commit
            with contextlib.closing(sqlite3.connect(store.path)) as db:
                count = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            assert count == min(50, rows * (k + 1))
            assert not store._writer.backlog.due
    finally:
        store.close()
