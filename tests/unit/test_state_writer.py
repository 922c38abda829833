"""The state writer's thread: grouped commits, order, reads that see every write, a failing
disk retried with the journal kept, and a stop that drains everything."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from taskd.errors import StateNotSaved
from taskd.state import writer as writer_mod
from taskd.state.store import StateStore
from taskd.state.writer import Writer
from tests.unit.test_store import _abandon


def _writer(store: StateStore) -> Writer:
    w = store._writer
    assert w is not None
    return w


def _commits(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the writer's commits (each appends the number of rows waiting)."""
    w = _writer(store)
    real = w._write_pending
    seen: list[int] = []

    def counting() -> None:
        seen.append(len(w.pending.ticks) + len(w.pending.runs))
        real()

    monkeypatch.setattr(w, "_write_pending", counting)
    return seen


async def _window(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next group wait for a minute: grouping on whatever the rate, and a commit
    just made starts the window."""
    monkeypatch.setattr(writer_mod, "GROUP_SECONDS", 60.0)
    monkeypatch.setattr(writer_mod, "BUSY_OPS", 0)
    store.set_tick("primer", 0.0)
    await store.durable()


def _ticks(path: Path) -> dict[str, float]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, last_tick FROM jobs"))


def _journal(path: Path) -> bytes:
    return (path.parent / "ticks.journal").read_bytes() + (
        path.parent / "ticks.journal.1"
    ).read_bytes()


def _poll(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class TestGrouping:
    """Writes from many loop iterations go into one commit, by time or by count."""

    async def test_many_iterations_one_commit(self, store: StateStore, monkeypatch) -> None:
        await _window(store, monkeypatch)  # only durable() ends the next group
        commits = _commits(store, monkeypatch)
        for i in range(50):
            store.set_tick(f"j{i}", float(i))
            await asyncio.sleep(0)  # each in a loop iteration of its own
        assert _ticks(store.path) == {"primer": 0.0}
        await store.durable()
        assert commits == [50]
        assert len(_ticks(store.path)) == 51

    async def test_a_sparse_load_commits_at_once(self, store: StateStore, monkeypatch) -> None:
        monkeypatch.setattr(writer_mod, "GROUP_SECONDS", 60.0)
        for i in range(3):  # a few rows a second: each committed as it comes
            store.set_tick("a", float(i))
            await asyncio.to_thread(_poll, lambda i=i: _ticks(store.path) == {"a": float(i)})

    async def test_a_full_group_commits_at_once(self, store: StateStore, monkeypatch) -> None:
        await _window(store, monkeypatch)
        commits = _commits(store, monkeypatch)
        for i in range(writer_mod.GROUP_OPS):
            store.set_tick(f"j{i}", 1.0)
        await asyncio.to_thread(_poll, lambda: bool(commits))  # no durable(): the count did it
        assert sum(commits) >= writer_mod.GROUP_OPS // 2

    async def test_the_loop_never_waits_for_a_commit(self, store: StateStore, monkeypatch) -> None:
        """Not even after a burst: a commit can sit behind a checkpoint's fdatasync. Measured
        (bench/spread.py --burst --jobs 10000), waiting for a burst's commit gave no win."""
        w = _writer(store)
        in_commit, release = threading.Event(), threading.Event()
        real = w._write_pending

        def stuck() -> None:  # a commit held up by the disk
            in_commit.set()
            release.wait(30)
            real()

        monkeypatch.setattr(w, "_write_pending", stuck)
        store.set_tick("first", 1.0)  # a sparse load: committed at once, and stuck there
        await asyncio.to_thread(in_commit.wait, 10)
        for i in range(5000):  # one loop iteration's burst
            store.set_tick(f"j{i}", 1.0)
        for _ in range(3):
            await asyncio.sleep(0)  # iterations end: none of them waits for the commit
        assert not release.is_set()
        assert _ticks(store.path) == {}  # still stuck: the loop went on regardless
        release.set()
        await store.durable()
        assert len(_ticks(store.path)) == 5001

    async def test_a_group_closes_by_time(self, store: StateStore, monkeypatch) -> None:
        await _window(store, monkeypatch)
        monkeypatch.setattr(writer_mod, "GROUP_SECONDS", 0.2)
        store.set_tick("a", 1.0)  # no durable(): the window's end commits it
        await asyncio.to_thread(_poll, lambda: _ticks(store.path).get("a") == 1.0)


class TestOrder:
    """Later writes win, across groups too; reads see every write made before them."""

    async def test_run_row_across_groups(self, store: StateStore) -> None:
        store.run_started("r1", "a", 1.0, 1.5, "schedule")
        await store.durable()
        store.run_finished("r1", "a", 1.0, 1.5, 1, 0.5, "succeeded", None, "schedule", "7")
        store.run_started("r2", "a", 2.0, 2.5, "schedule")
        store.set_tick("a", 2.0)
        store.set_tick("a", 3.0)
        await store.durable()
        assert [(r["run_id"], r["outcome"]) for r in store.history("a")] == [
            ("r2", "running"),
            ("r1", "succeeded"),
        ]
        assert _ticks(store.path) == {"a": 3.0}

    async def test_reads_need_no_durable(self, store: StateStore) -> None:
        store.run_started("r1", "a", 1.0, 1.5, "schedule")
        store.run_finished("r1", "a", 1.0, 1.5, 1, 0.5, "failed", "boom", "schedule")
        store.set_paused("a", True)
        assert store.history("a")[0]["outcome"] == "failed"  # the read waits for the commit
        row = store.jobs()["a"]
        assert (row.paused, row.last_outcome, row.failures) == (True, "failed", 0)


def _failing_commits(
    monkeypatch: pytest.MonkeyPatch, w: Writer, error: str, times: int | None = None
) -> dict[str, int]:
    """Make ``w``'s commits raise OperationalError(``error``): the next ``times`` of them
    (then they work again), or all (None). Returns the count still to fail."""
    real = w._write_pending
    left = {"left": -1 if times is None else times}

    def failing() -> None:
        if left["left"]:
            left["left"] -= 1
            raise sqlite3.OperationalError(error)
        real()

    monkeypatch.setattr(w, "_write_pending", failing)
    return left


class TestFailure:
    """A failing commit keeps the rows and the journal, is retried, and says so."""

    async def test_failing_then_recovered(self, store: StateStore, monkeypatch) -> None:
        monkeypatch.setattr(writer_mod, "RETRY_SECONDS", 0.05)
        _failing_commits(monkeypatch, _writer(store), "database or disk is full", times=3)
        with capture_logs() as logs:
            store.set_tick("a", 5.0)
            store.run_started("r1", "a", 5.0, 5.1, "schedule")
            await store.durable()  # released by the failed commit
            assert store.failing and store.write_errors == 1
            # Kept: in memory for reads, and on disk in the journal for a crash now.
            assert store.jobs()["a"].last_tick == 5.0
            assert b"R\tr1\ta\t" in _journal(store.path)
            await asyncio.to_thread(_poll, lambda: not store.failing)
        assert _ticks(store.path) == {"a": 5.0}
        assert store.history("a")[0]["run_id"] == "r1"
        events = [e["event"] for e in logs]
        assert events.count("state_write_failed") == 3
        assert events.count("state_write_recovered") == 1
        failed = next(e for e in logs if e["event"] == "state_write_failed")
        assert failed["path"] == str(store.path) and "disk is full" in failed["error"]

    def test_close_while_failing_keeps_the_journal(self, tmp_path: Path, monkeypatch) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        _failing_commits(monkeypatch, _writer(s), "disk I/O error")
        with capture_logs():
            with pytest.raises(sqlite3.OperationalError):
                s.set_tick("a", 9.0)  # no loop: written through, and the failure raised
            with pytest.raises(StateNotSaved) as lost:
                s.close()
        assert lost.value.ticks == 1 and lost.value.runs == 0
        assert "disk I/O error" in lost.value.error, lost.value.error
        assert b"T\ta\t9.0" in _journal(s.path)
        again = StateStore(tmp_path / "state.db")
        again.open()  # the journal replays what the disk refused
        assert again.jobs()["a"].last_tick == 9.0
        again.close()

    def test_close_waits_for_the_disk(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setattr(writer_mod, "RETRY_SECONDS", 0.05)
        s = StateStore(tmp_path / "state.db")
        s.open()
        # Two writes, the stop's commit and two retries fail; then there is room.
        fail = _failing_commits(monkeypatch, _writer(s), "database or disk is full", times=5)
        with capture_logs() as logs:
            with contextlib.suppress(sqlite3.OperationalError):  # no loop: written through
                s.set_tick("a", 9.0)
            with contextlib.suppress(sqlite3.OperationalError):
                s.run_started("r1", "a", 9.0, 9.1, "schedule")
            s.close(wait=5.0)  # no StateNotSaved: the disk came back within the wait
        assert fail["left"] == 0
        assert [e["event"] for e in logs].count("state_close_waiting") == 1
        assert _ticks(s.path) == {"a": 9.0}
        again = StateStore(tmp_path / "state.db")
        again.open()
        assert again.history("a")[0]["run_id"] == "r1"
        again.close()

    def test_close_wait_is_bounded(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setattr(writer_mod, "RETRY_SECONDS", 0.05)
        s = StateStore(tmp_path / "state.db")
        s.open()
        _failing_commits(monkeypatch, _writer(s), "database or disk is full")
        with capture_logs():
            for write in (
                lambda: s.set_tick("a", 9.0),  # no loop: each written through, and raises
                lambda: s.run_started("r1", "a", 9.0, 9.1, "schedule"),
                lambda: s.run_started("r2", "a", 9.0, 9.2, "schedule"),
            ):
                with contextlib.suppress(sqlite3.OperationalError):
                    write()
            with pytest.raises(StateNotSaved) as lost:
                s.close(wait=0.3)
        assert (lost.value.runs, lost.value.ticks) == (2, 1)
        assert "disk is full" in lost.value.error, lost.value.error


class TestClose:
    """A stop commits everything queued, empties the -wal and the journal."""

    async def test_close_drains(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setattr(writer_mod, "GROUP_SECONDS", 60.0)
        s = StateStore(tmp_path / "state.db")
        s.open()
        for i in range(200):
            s.run_started(f"r{i}", "a", float(i), float(i), "schedule")
            s.set_tick("a", float(i))
        s.close()  # no durable(): the stop itself commits
        wal = tmp_path / "state.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0
        assert _journal(tmp_path / "state.db") == b""
        assert _ticks(tmp_path / "state.db") == {"a": 199.0}
        with sqlite3.connect(tmp_path / "state.db") as db:
            assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 200
        s.run_finished("r0", "a", 0.0, 0.0, 1, 0.1, "succeeded", None, "schedule")  # dropped


class TestJournalTurns:
    """The two journal files take turns; a file is emptied only after its rows commit."""

    async def test_lines_after_the_cut_survive_the_commit(
        self, store: StateStore, monkeypatch
    ) -> None:
        await _window(store, monkeypatch)
        store.set_tick("a", 1.0)
        store.journal.flush()
        w = _writer(store)
        first = store.journal._files[store.journal._active].path
        blocked = asyncio.Event()
        release = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        real = w._write_pending

        def slow() -> None:
            # The commit is under way (the cut made): the loop writes another tick meanwhile.
            loop.call_soon_threadsafe(blocked.set)
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(release, 10), loop).result()
            real()

        w._write_pending = slow  # type: ignore[method-assign]
        waiter = asyncio.ensure_future(store.durable())
        await blocked.wait()
        store.set_tick("b", 2.0)
        store.journal.flush()
        release.set_result(None)
        await waiter
        w._write_pending = real  # type: ignore[method-assign]
        assert first.read_bytes() == b""  # its line is committed
        assert b"T\tb\t2.0" in _journal(store.path)  # committed or not, still on record


class TestPauseJournaled:
    """A pause is on record before ``taskd pause`` answers: a kill -9 before the commit
    keeps it, and the newest pause or resume wins whichever journal file holds it."""

    async def test_pause_survives_a_kill_before_the_commit(
        self, tmp_path: Path, monkeypatch
    ) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        await _window(s, monkeypatch)  # the next commit would come a minute later
        s.set_paused("a", True)
        s.set_paused("b", True)
        s.set_paused("b", False)
        _abandon(s)
        again = StateStore(tmp_path / "state.db")
        again.open()
        rows = again.jobs()
        assert (rows["a"].paused, rows["b"].paused) == (True, False)
        again.close()

    def test_newest_across_the_two_files(self, tmp_path: Path) -> None:
        (tmp_path / "ticks.journal").write_text("P\ta\t1\t1700000002.0\nP\tb\t0\t1700000001.0\n")
        (tmp_path / "ticks.journal.1").write_text("P\ta\t0\t1700000001.0\nP\tb\t1\t1700000002.0\n")
        s = StateStore(tmp_path / "state.db")
        s.open()
        rows = s.jobs()
        assert (rows["a"].paused, rows["b"].paused) == (True, True)
        s.close()
