"""Run ends in the tick journal (E lines): a kill before the writer's commit leaves the history
row with the run's real outcome, replayed once, clipped to a bounded line, malformed ones
skipped."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from taskd.state import endline, journal
from taskd.state.journal import TickJournal
from taskd.state.store import StateStore
from tests.unit.test_store import _abandon


def _end(
    run_id: str = "r1",
    job: str = "a",
    *,
    scheduled: float = 10.0,
    started: float = 10.5,
    attempts: int = 2,
    duration: float = 0.25,
    outcome: str = "failed",
    trigger: str = "schedule",
    failures: int = 3,
    error: str | None = "boom\tand\nmore",
    result: str | None = None,
) -> str:
    row = (run_id, job, scheduled, started, attempts, duration, outcome, error, trigger, result)
    return endline.end_line(row, failures)


def _runs(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return list(
            db.execute(
                "SELECT run_id, outcome, attempts, duration, error, result FROM runs ORDER BY seq"
            )
        )


def _results(tmp_path: Path) -> dict[str, str]:
    with sqlite3.connect(tmp_path / "state.db") as db:
        return dict(db.execute("SELECT run_id, result FROM runs"))


def _crashed_store(tmp_path: Path) -> StateStore:
    """A store whose run r1 started and was committed as running (no loop: written through)."""
    s = StateStore(tmp_path / "state.db")
    s.open()
    s.run_started("r1", "a", 10.0, 10.5, "schedule")
    return s


def _reopen(tmp_path: Path) -> StateStore:
    s = StateStore(tmp_path / "state.db")
    s.open()
    return s


class TestReplay:
    """What a daemon killed between a run's end and the commit holding it leaves behind."""

    def test_the_end_replaces_running_not_interrupted(self, tmp_path: Path) -> None:
        s = _crashed_store(tmp_path)
        # Only the journal has the end: the commit that would have held it never came.
        s.journal.run_finished(_end(error="boom\tx", result='{"n": 1}'))
        s.journal.flush()
        _abandon(s)
        again = _reopen(tmp_path)
        (run,) = again.history("a")
        assert (run["outcome"], run["attempts"], run["error"]) == ("failed", 2, "boom\tx")
        assert run["duration"] == 0.25
        assert _results(tmp_path) == {"r1": '{"n": 1}'}
        row = again.jobs()["a"]
        assert (row.last_run_id, row.last_outcome, row.failures) == ("r1", "failed", 3)
        assert (tmp_path / "ticks.journal").read_bytes() == b""
        again.close()

    def test_a_run_started_and_ended_between_commits(self, tmp_path: Path) -> None:
        s = StateStore(tmp_path / "state.db")
        s.open()
        s.journal.run_started("r2", "b", 1.0, 1.0, "manual")
        s.journal.run_finished(
            _end(
                "r2",
                "b",
                scheduled=1.0,
                started=1.0,
                attempts=1,
                duration=2.0,
                outcome="succeeded",
                trigger="manual",
                failures=0,
                error=None,
                result="7",
            )
        )
        _abandon(s)
        again = _reopen(tmp_path)
        (run,) = again.history("b")
        assert (run["run_id"], run["outcome"]) == ("r2", "succeeded")
        assert _results(tmp_path) == {"r2": "7"}
        assert again.jobs()["b"].last_success == 3.0
        again.close()

    def test_an_end_before_its_start_in_the_other_file(self, tmp_path: Path) -> None:
        # The files take turns: after a failed commit the end can sit in the file read first.
        (tmp_path / "ticks.journal").write_text(_end(outcome="timed_out"))
        (tmp_path / "ticks.journal.1").write_text("R\tr1\ta\t10.0\t10.5\tschedule\n")
        s = _reopen(tmp_path)
        assert [r["outcome"] for r in s.history("a")] == ["timed_out"]
        s.close()

    def test_a_committed_end_is_not_overwritten_or_doubled(self, tmp_path: Path) -> None:
        s = _crashed_store(tmp_path)
        big = json.dumps("x" * 5000)
        s.run_finished("r1", "a", 10.0, 10.5, 1, 0.5, "succeeded", None, "schedule", big, 0)
        s.run_started("r3", "a", 20.0, 20.5, "schedule")
        s.run_finished("r3", "a", 20.0, 20.5, 1, 0.5, "succeeded", None, "schedule", "1", 0)
        # Committed (no loop: written through); the same lines again, as a crash between the
        # commit and the journal's emptying would leave them.
        s.journal.run_finished(
            _end(attempts=1, duration=0.5, outcome="succeeded", failures=0, error=None, result=big)
        )
        s.journal.flush()
        _abandon(s)
        before = _runs(tmp_path / "state.db")
        again = _reopen(tmp_path)
        assert _runs(tmp_path / "state.db") == before  # the full result kept, no new row
        row = again.jobs()["a"]
        assert row.last_run_id == "r3"  # an older run's end does not become the last one
        again.close()

    def test_a_long_error_and_result_are_clipped_saying_so(self, tmp_path: Path) -> None:
        s = _crashed_store(tmp_path)
        s.journal.run_finished(_end(error="é" * 9000, result=json.dumps("y" * 9000)))
        s.journal.flush()
        line = (tmp_path / "ticks.journal").read_bytes()
        assert len(line) < journal.MAX_LINE_BYTES
        _abandon(s)
        again = _reopen(tmp_path)
        (run,) = again.history("a")
        assert run["error"] == "é" * endline.CLIP_CHARS + "...(truncated)"
        cut = json.dumps(json.dumps("y" * 9000)[: endline.CLIP_CHARS] + "...(truncated)")
        assert _results(tmp_path) == {"r1": cut}  # a JSON string of the cut text
        again.close()


class TestBounded:
    def test_only_the_newest_ends_are_kept(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setattr(journal, "MAX_REPLAY_RUNS", 3)
        path = tmp_path / "ticks.journal"
        path.write_text("".join(_end(f"r{i}") for i in range(10)))
        replay = TickJournal(path).open()
        assert list(replay.ends) == ["r7", "r8", "r9"]
        assert replay.runs_dropped == 7


class TestMalformed:
    @pytest.mark.parametrize(
        ("line", "problem"),
        [
            (_end(outcome="running"), "not a run outcome"),
            (_end(outcome="bogus"), "not a run outcome"),
            (_end(attempts=0), "attempts, failures or duration out of range"),
            (_end(duration=float("nan")), "attempts, failures or duration out of range"),
            (_end(duration=float("inf")), "attempts, failures or duration out of range"),
            (
                _end(failures=3).replace("\t3\t", "\tthree\t"),
                "attempts, failures, duration, error or result unreadable",
            ),
            (
                _end().replace('"boom', "boom"),
                "attempts, failures, duration, error or result unreadable",
            ),
            (_end().replace("\tnull\n", "\t[1]\n"), "error or result not text"),
            (_end(trigger="bogus"), "invalid run id or trigger"),
            (_end(run_id="r 1"), "invalid run id or trigger"),
            (_end(job="-a"), "invalid job name"),
            (_end(started=float("inf")), None),  # state_value_invalid, as for an R line
            (_end()[:-5] + "\n", "attempts, failures, duration, error or result unreadable"),
            (_end().replace("\tnull\n", "\n"), "not a T, R, P or E entry"),
        ],
    )
    def test_skipped_with_a_warning_the_rest_replays(
        self, tmp_path: Path, line: str, problem: str | None
    ) -> None:
        path = tmp_path / "ticks.journal"
        path.write_text("T\tgood\t1.0\n" + line + _end("r9", "good"))
        with capture_logs() as logs:
            replay = TickJournal(path).open()
        assert replay.ticks == {"good": 1.0}
        assert list(replay.ends) == ["r9"]
        assert replay.bad_lines == 1
        if problem is not None:
            skipped = [e for e in logs if e["event"] == "journal_line_skipped"]
            assert [e["problem"] for e in skipped] == [problem]


def test_the_longest_line_fits_the_replay_limit() -> None:
    # Control characters: the most bytes a character can become (\u0001, its backslash
    # escaped again for the result's JSON text); the longest run id and job name.
    worst = "\x01" * 9000
    line = _end("r" * 64, "j" * 100, error=worst, result=worst, duration=1e-300)
    assert len(line.encode()) < journal.MAX_LINE_BYTES
    end, problem = endline.parse_end(line.rstrip("\n").split("\t"))
    assert end is not None, problem
    assert end.error == "\x01" * endline.CLIP_CHARS + "...(truncated)"
