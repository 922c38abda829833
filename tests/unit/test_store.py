"""The state store: batched commits, durability waits, and what a write failure does."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from taskd.state.dbfile import APPLICATION_ID
from taskd.state.schema import SCHEMA_VERSION
from taskd.state.store import JobRow, StateStore
from taskd.state.ticklog import TickLog


def _abandon(s: StateStore) -> None:
    """Leave the store as a kill -9 would: its connection closed without a final commit,
    checkpoint or journal reset."""
    w = s._writer
    assert w is not None
    w._cycle = lambda **_: None  # type: ignore[method-assign]
    w._final = lambda: w.db.close()  # type: ignore[method-assign]
    w.close()
    s._writer = None
    s.journal.close()


def _ticks(path: Path) -> dict[str, float]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, last_tick FROM jobs"))


class TestBatching:
    """Writes in one window become one commit; durable() returns after it."""

    async def test_durable_waits_for_the_commit(self, store: StateStore, monkeypatch) -> None:
        from taskd.state import writer

        monkeypatch.setattr(writer, "GROUP_SECONDS", 60.0)
        monkeypatch.setattr(writer, "BUSY_OPS", 0)  # grouped however few
        store.set_tick("a", 10.0)  # no commit in the last window: committed at once
        await store.durable()
        store.set_tick("b", 20.0)
        store.set_tick("c", 30.0)
        assert _ticks(store.path) == {"a": 10.0}  # within the window: not yet committed
        await store.durable()
        assert _ticks(store.path) == {"a": 10.0, "b": 20.0, "c": 30.0}

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
        writer = store._writer
        assert writer is not None
        real_write = writer._write_pending
        calls = {"n": 0}

        def failing_once() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise sqlite3.OperationalError("database or disk is full")
            real_write()

        monkeypatch.setattr(writer, "_write_pending", failing_once)
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
        # As a kill -9 would leave it: no close(), no final checkpoint. The writer is
        # stopped without committing anything more (there is nothing more).
        _abandon(s)
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
    """A schema-1 database (taskd before the result column) is brought to the latest schema."""

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
            assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (
                str(SCHEMA_VERSION),
            )
            assert db.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
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


def _stored(path: Path, sql: str, *args: object) -> None:
    """Write into a closed store's database behind taskd's back, as another program could."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(sql, args)


def _reopen(
    path: Path, logs: list[dict[str, Any]] | None = None
) -> tuple[dict[str, JobRow], list[dict[str, Any]]]:
    """The rows a new store reads, and the state_value_invalid lines it logged (all the
    lines it logged go to ``logs``)."""
    s = StateStore(path)
    with capture_logs() as captured:
        s.open()
        rows = s.jobs()
    s.close()
    if logs is not None:
        logs.extend(captured)
    return rows, [e for e in captured if e["event"] == "state_value_invalid"]


@pytest.fixture
def closed(tmp_path: Path) -> Path:
    """A state database holding job "a" (cursor 100.0, one run) and job "b", closed."""
    s = StateStore(tmp_path / "state.db")
    s.open()
    s.set_tick("a", 100.0)
    s.set_tick("b", 200.0)
    s.run_finished("r1", "a", 100.0, 100.5, 1, 0.25, "succeeded", None, "schedule", '{"n": 1}')
    s.close()
    return s.path


BAD_TIMES: list[object] = [
    math.inf,
    -math.inf,
    1e12,
    -1e308,
    -5.0,
    "abc",  # SQLite keeps text that does not look like a number in a REAL column
    b"\x00",
]


class TestReadBackChecked:
    """Values read back from the database or the journal are checked: a bad one is logged
    and read as absent (the job starts as if new), never crashing the start."""

    @pytest.mark.parametrize("value", BAD_TIMES)
    def test_bad_cursor_in_the_database(self, closed: Path, value: object) -> None:
        _stored(closed, "UPDATE jobs SET last_tick = ? WHERE name = 'a'", value)
        rows, invalid = _reopen(closed)
        assert rows["a"].last_tick is None  # the scheduler starts it from now
        assert rows["b"].last_tick == 200.0
        (bad,) = invalid
        assert (bad["job"], bad["field"], bad["value"]) == ("a", "last_tick", repr(value))
        assert bad["source"] == f"state database {closed}, table jobs"

    @pytest.mark.parametrize("value", ["inf", "nan", "1e12", "-1e308", "-5.0", "abc"])
    def test_bad_tick_in_the_journal(self, closed: Path, value: str) -> None:
        (closed.parent / "ticks.journal").write_text(f"T\tc\t{value}\nT\tb\t300.0\n")
        logs: list[dict[str, Any]] = []
        rows, invalid = _reopen(closed, logs)
        assert "c" not in rows
        assert rows["b"].last_tick == 300.0  # the rest of the journal replays
        if value == "abc":  # not a number at all: a malformed line, skipped with a warning
            assert invalid == []
            (skipped,) = [e for e in logs if e["event"] == "journal_line_skipped"]
            assert skipped["problem"] == "tick is not a number"
        else:
            (bad,) = invalid
            assert (bad["job"], bad["field"], bad["value"]) == ("c", "tick", value)
            assert bad["source"] == f"tick journal {closed.parent / 'ticks.journal'}:1"

    @pytest.mark.parametrize("value", [math.inf, 1e12, "abc"])
    def test_journal_tick_replaces_a_bad_stored_one(self, closed: Path, value: object) -> None:
        _stored(closed, "UPDATE jobs SET last_tick = ? WHERE name = 'a'", value)
        (closed.parent / "ticks.journal").write_text("T\ta\t150.0\n")
        rows, invalid = _reopen(closed)
        assert rows["a"].last_tick == 150.0
        assert invalid == []

    @pytest.mark.parametrize("name", ["a\n", "a\tb", "", "x" * 101, b"a"])
    def test_row_with_an_invalid_name_is_ignored(self, closed: Path, name: object) -> None:
        _stored(closed, "INSERT INTO jobs (name, last_tick) VALUES (?, 1.0)", name)
        rows, invalid = _reopen(closed)
        assert set(rows) == {"a", "b"}
        (bad,) = invalid
        assert (bad["field"], bad["action"]) == ("name", "row ignored")

    @pytest.mark.parametrize(
        ("column", "value", "read_as"),
        [
            ("last_started", math.inf, None),
            ("last_started", "yesterday", None),
            ("last_success", -1e308, None),
            ("last_success", 1e12, None),
            ("last_duration", math.inf, None),
            ("last_duration", -1.0, None),
            ("last_duration", "long", None),
            ("last_outcome", "exploded", None),
            ("last_run_id", b"r1", None),  # TEXT affinity keeps a blob a blob
            ("last_error", b"\xff", None),
            ("last_result", "{not json", None),
            ("last_result", "[" * 100_000 + "]" * 100_000, None),
            ("failures", -3, 0),
            ("failures", "many", 0),
            ("failures", 2.5, 0),
            ("paused", 7, False),
            ("paused", "yes", False),
        ],
    )
    def test_bad_value_in_another_column(
        self, closed: Path, column: str, value: object, read_as: object
    ) -> None:
        _stored(closed, f"UPDATE jobs SET {column} = ? WHERE name = 'a'", value)
        rows, invalid = _reopen(closed)
        assert [e["field"] for e in invalid] == [column]
        row = rows["a"]
        assert getattr(row, column) == read_as
        assert row.last_tick == 100.0  # the rest of the row stands
        if column in ("last_run_id", "last_outcome"):  # one without the other means nothing
            assert (row.last_run_id, row.last_outcome) == (None, None)

    def test_good_row_reads_back_unchanged(self, closed: Path) -> None:
        rows, invalid = _reopen(closed)
        assert invalid == []
        a = rows["a"]
        assert (a.last_tick, a.last_run_id, a.last_outcome) == (100.0, "r1", "succeeded")
        assert (a.last_started, a.last_duration, a.last_success) == (100.5, 0.25, 100.75)
        assert (a.last_result, a.failures, a.paused) == ({"n": 1}, 0, False)


class TestUnencodable:
    """A lone surrogate in what a run left (its error, a shared-state key) is stored escaped:
    it cannot be UTF-8, and failed that commit and every later one."""

    async def test_error_and_key_with_a_lone_surrogate(self, store: StateStore) -> None:
        store.run_finished(
            "r1", "a", 1.0, 1.5, 1, 0.1, "failed", "ValueError: x\ud800", "schedule", '"\\ud800"'
        )
        store.set_shared({"k\udc80": 1}, frozenset({"k\udc80"}))
        store.set_tick("a", 5.0)
        await store.durable()
        assert not store.failing
        row = store.history("a")[0]
        assert row["error"] == "ValueError: x\\ud800"
        assert store.shared() == {"k\\udc80": 1}
        assert store.jobs()["a"].last_result == "\ud800"  # the JSON escape: the same value
        assert _ticks(store.path) == {"a": 5.0}


class TestNamesCheckedOnce:
    """A name is checked when it first comes to the store; a bad one is refused every time."""

    @pytest.mark.parametrize("name", ["a\n", "a\tb", "", "\nT\tb\t9e9"])
    def test_bad_name_refused_by_every_write(self, tmp_path: Path, name: str) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        try:
            s.set_tick("good", 5.0)  # a good name admitted first lets no other through
            for _ in range(2):  # refused again: a refusal does not admit the name
                with pytest.raises(ValueError, match="not valid"):
                    s.set_tick(name, 1.0)
                with pytest.raises(ValueError, match="not valid"):
                    s.run_started("r1", name, 1.0, 1.0, "schedule")
                with pytest.raises(ValueError, match="not valid"):
                    s.run_finished("r1", name, 1.0, 1.0, 1, 0.1, "succeeded", None, "schedule")
                with pytest.raises(ValueError, match="not valid"):
                    s.set_paused(name, True)
            assert name not in s._names
            s.flush()
        finally:
            s.close()
        assert _ticks(tmp_path / "state.db") == {"good": 5.0}


class TestTickAndRunStarted:
    """The fused path's one call: the tick and the run's start, both on record."""

    def test_one_write_tick_first(self, tmp_path: Path) -> None:
        log = TickLog(tmp_path / "ticks.journal")
        log.open()
        try:
            log.tick_and_run_started("j", 7.0, "r1", 7.5, "schedule")
            # Written at once (no flush left for later), the tick before the run.
            text = (tmp_path / "ticks.journal").read_text()
            assert text == "T\tj\t7.0\nR\tr1\tj\t7.0\t7.5\tschedule\n"
            assert not log._flush_scheduled
        finally:
            log.close()

    async def test_replayed_after_a_kill(self, tmp_path: Path) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        s.tick_and_run_started("j", 7.0, "r1", 7.5, "schedule")
        _abandon(s)  # committed or not: the journal has it
        again = StateStore(tmp_path / "state.db")
        again.open()
        try:
            assert again.jobs()["j"].last_tick == 7.0
            [row] = again.history("j")
            assert (row["run_id"], row["scheduled"], row["outcome"]) == ("r1", 7.0, "interrupted")
        finally:
            again.close()
