"""The tick journal: appended per tick and run start, replayed into the store, then emptied."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from taskd.state.journal import TickJournal
from taskd.state.store import StateStore


class TestJournal:
    """What one process appends, the next one reads back."""

    def test_replay_keeps_latest_tick_and_every_run(self, tmp_path: Path) -> None:
        j = TickJournal(tmp_path / "ticks.journal")
        assert j.open().ticks == {}
        j.tick("a", 10.0)
        j.tick("a", 20.0)
        j.tick("b", 5.5)
        j.tick("a", 15.0)  # never backwards, whatever the order on disk
        j.run_started("r1", "a", 20.0, 20.25, "schedule")
        j.close()
        replay = TickJournal(tmp_path / "ticks.journal").open()
        assert replay.ticks == {"a": 20.0, "b": 5.5}
        assert replay.runs == [("r1", "a", 20.0, 20.25, "schedule")]
        assert replay.bad_lines == 0

    def test_torn_or_foreign_lines_are_skipped(self, tmp_path: Path) -> None:
        path = tmp_path / "ticks.journal"
        path.write_bytes(b"T\ta\t1.5\nT\tb\tnot-a-number\ngarbage\nR\tr1\ta\t1.5\n")
        replay = TickJournal(path).open()
        assert replay.ticks == {"a": 1.5}
        assert replay.runs == []
        assert replay.bad_lines == 3

    def test_reset_empties(self, tmp_path: Path) -> None:
        j = TickJournal(tmp_path / "ticks.journal")
        j.open()
        j.tick("a", 1.0)
        j.reset()
        j.tick("a", 2.0)
        j.close()
        assert (tmp_path / "ticks.journal").read_text() == "T\ta\t2.0\n"


class TestStoreReplay:
    """A store opened after a crash folds the journal in: ticks never go back, runs show."""

    def test_crash_between_journal_and_commit(self, tmp_path: Path) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        s._ticks["a"] = 5.0  # committed earlier
        s.flush()
        # What a daemon killed before its next commit leaves behind: only the journal has it.
        s.journal.tick("a", 7.0)
        s.journal.tick("b", 3.0)
        s.journal.run_started("r9", "a", 7.0, 7.1, "schedule")
        s.db.close()
        s._db = None
        s.journal.close()
        again = StateStore(tmp_path / "state.db")
        again.open()
        rows = again.jobs()
        assert (rows["a"].last_tick, rows["b"].last_tick) == (7.0, 3.0)
        (run,) = again.history("a")
        assert (run["run_id"], run["outcome"]) == ("r9", "interrupted")
        assert (tmp_path / "ticks.journal").read_bytes() == b""
        again.close()

    def test_journal_never_moves_a_tick_back(self, tmp_path: Path) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        s._ticks["a"] = 50.0
        s.flush()
        s.journal.tick("a", 40.0)
        s.close()
        again = StateStore(tmp_path / "state.db")
        again.open()
        assert again.jobs()["a"].last_tick == 50.0
        again.close()

    def test_commit_empties_the_journal(self, tmp_path: Path) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        s.set_tick("a", 1.0)  # no loop running: written through at once
        assert (tmp_path / "ticks.journal").read_bytes() == b""
        with sqlite3.connect(tmp_path / "state.db") as db:
            assert db.execute("SELECT last_tick FROM jobs WHERE name='a'").fetchone() == (1.0,)
        s.close()


class TestWriteFailure:
    """A journal that cannot be written is logged, never raised into the scheduler."""

    def test_write_error_is_counted_not_raised(self, tmp_path: Path) -> None:
        import os

        from structlog.testing import capture_logs

        j = TickJournal(tmp_path / "ticks.journal")
        j.open()
        assert j._fd is not None
        os.close(j._fd)  # as good as a disk that refuses every write
        with capture_logs() as logs:
            j.tick("a", 1.0)
            j.run_started("r", "a", 1.0, 1.0, "schedule")
        assert j.errors == 2
        assert [e["event"] for e in logs] == ["journal_write_failed"]  # rate-limited
        j._fd = None


class TestTornLine:
    """After a failed write, the next entry starts on a line of its own."""

    def test_entry_after_failure_survives_replay(self, tmp_path: Path) -> None:
        import os

        path = tmp_path / "ticks.journal"
        j = TickJournal(path)
        j.open()
        assert j._fd is not None
        os.write(j._fd, b"T\tb\t4.5e")  # what a write cut short by a full disk leaves
        real_fd = j._fd
        j._fd = os.open(os.devnull, os.O_RDONLY)  # every write now fails
        j.tick("a", 1.0)
        os.close(j._fd)
        j._fd = real_fd  # the disk recovers
        j.tick("a", 2.0)
        j.close()
        replay = TickJournal(path).open()
        assert replay.ticks == {"a": 2.0}
        assert replay.bad_lines == 1
