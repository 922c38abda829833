"""The tick journal: appended per tick and run start, replayed into the store, then emptied."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from taskd.state import journal
from taskd.state.journal import TickJournal
from taskd.state.store import StateStore
from tests.unit.test_store import _abandon


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
        s.set_tick("a", 5.0)  # committed earlier (no loop: written through)
        # What a daemon killed before its next commit leaves behind: only the journal has it.
        s.journal.tick("a", 7.0)
        s.journal.tick("b", 3.0)
        s.journal.run_started("r9", "a", 7.0, 7.1, "schedule")
        _abandon(s)
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
        s.set_tick("a", 50.0)
        s.journal.tick("a", 40.0)
        _abandon(s)  # killed: the journal is replayed at the next start
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


BAD_TICKS = ["inf", "-inf", "nan", "1e12", "-1e308", "-5.0", "-0.5"]


class TestReplayChecksValues:
    """A tick out of range is logged and ignored; the rest of the journal replays."""

    @pytest.mark.parametrize("value", BAD_TICKS)
    def test_bad_tick_is_ignored_and_logged(self, tmp_path: Path, value: str) -> None:
        path = tmp_path / "ticks.journal"
        path.write_text(f"T\ta\t5.0\nT\ta\t{value}\nT\tb\t2.0\n")
        with capture_logs() as logs:
            replay = TickJournal(path).open()
        assert replay.ticks == {"a": 5.0, "b": 2.0}
        assert replay.bad_lines == 1
        (bad,) = [e for e in logs if e["event"] == "state_value_invalid"]
        assert (bad["job"], bad["field"], bad["value"]) == ("a", "tick", value)
        assert bad["source"] == f"tick journal {path}:2"

    @pytest.mark.parametrize("value", BAD_TICKS)
    def test_bad_run_time_is_ignored_and_logged(self, tmp_path: Path, value: str) -> None:
        path = tmp_path / "ticks.journal"
        path.write_text(f"R\tr1\ta\t{value}\t1.0\tschedule\nR\tr2\ta\t1.0\t1.5\tmanual\n")
        with capture_logs() as logs:
            replay = TickJournal(path).open()
        assert replay.runs == [("r2", "a", 1.0, 1.5, "manual")]
        (bad,) = [e for e in logs if e["event"] == "state_value_invalid"]
        assert (bad["job"], bad["field"], bad["value"]) == ("a", "scheduled", value)

    def test_a_little_ahead_of_the_clock_is_kept(self, tmp_path: Path) -> None:
        """The wall clock went back: the scheduler waits for it, so the tick must stay."""
        ahead = time.time() + 86400.0
        path = tmp_path / "ticks.journal"
        path.write_text(f"T\ta\t{ahead!r}\n")
        assert TickJournal(path).open().ticks == {"a": ahead}

    @pytest.mark.parametrize(
        ("line", "problem"),
        [
            (b"T\ta\tabc\n", "tick is not a number"),  # a string
            (b"T\ta\t\n", "tick is not a number"),
            (b"T\ta\t0x10\n", "tick is not a number"),
            (b"T\ta\n\t5.0\n", "not a T, R, P or E entry"),  # a name with a newline tears the line
            (b"T\ta b\t5.0\n", "invalid job name"),
            (b"T\ta\r\t5.0\n", "invalid job name"),
            (b"T\t\t5.0\n", "invalid job name"),
            (b"T\t-a\t5.0\n", "invalid job name"),
            (b"T\t\xff\xfe\t5.0\n", "invalid job name"),
            (b"T\t" + b"a" * 101 + b"\t5.0\n", "invalid job name"),
            (b"T\ta\t5.0\textra\n", "not a T, R, P or E entry"),
            (b'{"job": "a", "tick": 5.0}\n', "not a T, R, P or E entry"),
            (b"R\tr 1\ta\t1.0\t1.0\tschedule\n", "invalid run id or trigger"),
            (b"R\tr1\ta\t1.0\t1.0\tbogus\n", "invalid run id or trigger"),
            (b"R\tr1\ta\t1.0\tsoon\tschedule\n", "started is not a number"),
        ],
    )
    def test_malformed_line_is_skipped_with_a_warning(
        self, tmp_path: Path, line: bytes, problem: str
    ) -> None:
        path = tmp_path / "ticks.journal"
        path.write_bytes(b"T\tgood\t1.0\n" + line + b"R\tr9\tgood\t1.0\t1.0\tschedule\n")
        with capture_logs() as logs:
            replay = TickJournal(path).open()
        assert replay.ticks == {"good": 1.0}
        assert replay.runs == [("r9", "good", 1.0, 1.0, "schedule")]
        skipped = [e for e in logs if e["event"] == "journal_line_skipped"]
        assert skipped
        assert skipped[0]["problem"] == problem
        assert skipped[0]["source"] == f"tick journal {path}:2"

    def test_a_journal_of_garbage_logs_a_bounded_number_of_lines(self, tmp_path: Path) -> None:
        path = tmp_path / "ticks.journal"
        path.write_bytes(b"T\ta\tinf\n" * 5000 + b"T\ta\t3.0\n")
        path.chmod(0o600)  # as taskd makes it (a 0644 one is narrowed, with a line of its own)
        with capture_logs() as logs:
            replay = TickJournal(path).open()
        assert replay.ticks == {"a": 3.0}
        assert replay.bad_lines == 5000
        assert len(logs) <= journal.MAX_REPORTED + 1
        assert logs[-1]["event"] == "journal_lines_skipped"
        assert logs[-1]["count"] == 5000


class TestWriterRefusesBadNames:
    """A name that would tear a line never reaches the journal, whatever let it through."""

    @pytest.mark.parametrize("name", ["a\n", "a\tb", "", "a b", "\nT\tb\t9e9"])
    def test_tick_and_run_start_refuse(self, tmp_path: Path, name: str) -> None:
        path = tmp_path / "ticks.journal"
        j = TickJournal(path)
        j.open()
        with pytest.raises(ValueError, match="not valid"):
            j.tick(name, 1.0)
        with pytest.raises(ValueError, match="not valid"):
            j.run_started("r1", name, 1.0, 1.0, "schedule")
        j.close()
        assert path.read_bytes() == b""


class TestReplayIsBounded:
    """Replay reads the journal a chunk at a time: its memory does not grow with the file."""

    def test_an_overlong_line_is_skipped_and_the_rest_replays(self, tmp_path: Path) -> None:
        path = tmp_path / "ticks.journal"
        garbage = b"x" * (3 * 1024 * 1024)  # spans chunks; no line of ours is this long
        path.write_bytes(b"T\ta\t1.0\n" + garbage + b"\nT\tb\t2.0\n" + garbage)
        replay = TickJournal(path).open()
        assert replay.ticks == {"a": 1.0, "b": 2.0}
        assert replay.bad_lines == 2

    def test_only_the_newest_run_starts_are_kept(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setattr(journal, "MAX_REPLAY_RUNS", 3)
        path = tmp_path / "ticks.journal"
        path.write_text("".join(f"R\tr{i}\ta\t1.0\t1.5\tschedule\n" for i in range(10)))
        with capture_logs() as logs:
            replay = TickJournal(path).open()
        assert [r[0] for r in replay.runs] == ["r7", "r8", "r9"]
        assert replay.runs_dropped == 7
        assert any(e["event"] == "journal_runs_dropped" and e["count"] == 7 for e in logs)
