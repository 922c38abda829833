"""The state store: batched commits, durability waits, and what a write failure does."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from taskd.state.store import StateStore


@pytest.fixture
def store(tmp_path: Path):
    s = StateStore(tmp_path / "state.db")
    s.open()
    yield s
    s.close()


def _ticks(path: Path) -> dict[str, float]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, last_tick FROM jobs"))


class TestBatching:
    """Writes in one loop iteration become one commit; durable() returns after it."""

    async def test_durable_waits_for_the_commit(self, store: StateStore) -> None:
        store.set_tick("a", 10.0)
        store.set_tick("b", 20.0)
        assert _ticks(store.path) == {}  # buffered, not yet committed
        await store.durable()
        assert _ticks(store.path) == {"a": 10.0, "b": 20.0}

    async def test_durable_with_nothing_pending_returns_at_once(self, store: StateStore) -> None:
        await asyncio.wait_for(store.durable(), 0.5)

    async def test_history_round_trip(self, store: StateStore) -> None:
        store.run_started("r1", "a", 1.0, 1.5, "schedule")
        await store.durable()
        assert store.history("a")[0]["outcome"] == "running"
        store.run_finished(
            "r1", "a", 1.0, 1.5, 2, 0.25, "failed", "ValueError: x", "schedule", None
        )
        await store.durable()
        row = store.history("a")[0]
        assert (row["attempts"], row["outcome"], row["error"]) == (2, "failed", "ValueError: x")


class TestWriteFailure:
    """A failing commit is retried and does not hold runs up."""

    async def test_waiters_released_and_write_retried(self, store: StateStore, monkeypatch) -> None:
        real_flush = store.flush
        calls = {"n": 0}

        def failing_once() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise sqlite3.OperationalError("database or disk is full")
            real_flush()

        monkeypatch.setattr(store, "flush", failing_once)
        store.set_tick("a", 5.0)
        await store.durable()  # released by the failed commit, not held until the retry
        assert store.write_errors == 1 and store.failing
        assert _ticks(store.path) == {}
        store.set_tick("b", 6.0)
        await asyncio.wait_for(store.durable(), 0.5)  # while failing: no wait at all
        for _ in range(30):  # the retry comes ~1 s later and commits what was buffered
            await asyncio.sleep(0.1)
            if _ticks(store.path):
                break
        assert _ticks(store.path) == {"a": 5.0, "b": 6.0}
        assert not store.failing


class TestReopen:
    """Runs left 'running' by a dead daemon read as 'interrupted' after a restart."""

    def test_running_becomes_interrupted(self, tmp_path: Path) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        s.run_started("r1", "a", 1.0, 1.0, "schedule")  # no loop: written through
        s.db.close()  # as a kill -9 would leave it: no close(), no final flush
        s._db = None
        again = StateStore(tmp_path / "state.db")
        again.open()
        assert again.history("a")[0]["outcome"] == "interrupted"
        again.close()


class TestOpenErrors:
    """Only a corrupt file is moved aside; a locked or unreadable one is an error."""

    def test_locked_database_is_not_moved_aside(self, tmp_path: Path) -> None:
        from taskd.errors import StateError

        path = tmp_path / "state.db"
        first = StateStore(path)
        first.open()
        first.set_tick("a", 1.0)
        first.close()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StateError, match="locked"):
                StateStore(path).open()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert not list(tmp_path.glob("state.db.corrupt-*"))
        again = StateStore(path)
        again.open()
        assert again.jobs()["a"].last_tick == 1.0
        again.close()


class TestSharedStatePersistence:
    """Values changed in place inside locked() are persisted, not only assignments."""

    async def test_in_place_changes_are_saved(self, store: StateStore) -> None:
        from taskd.state.shared import SharedState

        shared = SharedState(store.shared())
        shared.add_listener(store.set_shared)
        for i in range(3):
            async with shared.locked() as state:
                state.setdefault("seen", []).append(i)
                state.setdefault("counts", {"n": 0})
                state["counts"]["n"] += 1
        await store.durable()
        assert store.shared() == {"seen": [0, 1, 2], "counts": {"n": 3}}


class TestMigration:
    """A schema-1 database (taskd before the result column) is brought to schema 2."""

    def test_schema_1_is_migrated_keeping_everything(self, tmp_path: Path) -> None:
        from tests.unit.test_history_reader import SCHEMA_1

        path = tmp_path / "state.db"
        with sqlite3.connect(path) as db:
            db.executescript(SCHEMA_1)
            db.execute(
                "INSERT INTO jobs (name, last_tick, paused, last_run_id, last_outcome) "
                "VALUES ('a', 100.0, 1, 'r1', 'failed'), ('b', 200.0, 0, 'r2', 'succeeded')"
            )
            db.execute(
                "INSERT INTO runs (run_id, job, scheduled, started, outcome) "
                "VALUES ('r1', 'a', 1.0, 1.0, 'failed')"
            )
        db.close()
        s = StateStore(path)
        s.open()
        try:
            rows = s.jobs()
            assert (rows["a"].last_tick, rows["a"].paused) == (100.0, True)
            # Schema 1 kept no streak: a last failure counts as one.
            assert (rows["a"].failures, rows["b"].failures) == (1, 0)
            assert rows["a"].last_success is None
            s.run_finished("r3", "b", 3.0, 3.0, 1, 0.1, "succeeded", None, "manual", '{"x": 1}')
            s.flush()
        finally:
            s.close()
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
            assert db.execute("SELECT result FROM runs WHERE run_id='r3'").fetchone() == (
                '{"x": 1}',
            )
            assert db.execute("SELECT outcome FROM runs WHERE run_id='r1'").fetchone() == (
                "failed",
            )
        db.close()


class TestLastSuccess:
    """Each job's last success time survives restarts, even while the job keeps failing."""

    def test_kept_across_reopen_and_failures(self, tmp_path: Path) -> None:
        path = tmp_path / "state.db"
        s = StateStore(path)
        s.open()
        s.run_finished("r1", "a", 1.0, 10.0, 1, 2.5, "succeeded", None, "schedule", None, 0)
        s.flush()
        s.run_finished("r2", "a", 2.0, 20.0, 1, 1.0, "failed", "x", "schedule", None, 1)
        assert s.jobs()["a"].last_success == 12.5  # buffered writes are seen too
        s.close()
        s = StateStore(path)
        s.open()
        try:
            row = s.jobs()["a"]
            assert (row.last_outcome, row.failures, row.last_success) == ("failed", 1, 12.5)
        finally:
            s.close()
