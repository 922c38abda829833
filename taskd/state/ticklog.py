"""The tick journal as the store uses it: lines batched per loop iteration, in two files that
take turns, so the writer thread can empty one while the loop appends to the other.

What must be on record before a run starts (its tick, and that it started) is appended to the
journal (taskd.state.journal) by the loop thread; the writer thread (taskd.state.writer)
commits the same rows to SQLite later, in groups. A journal file may only be emptied once
everything in it is committed, but under a steady load the loop appends a line every few
milliseconds, so a single file would never be found with nothing newer than the last commit.
So there are two: before draining its queue for a commit the writer *cuts*, making the other
(empty) file the one appended to; once that commit succeeds it empties the file it cut from.
Every row whose line is in that file was queued before its line was written, so before the cut,
so it was in that commit. Replay at start reads both files.

Lines are buffered and written with one ``write(2)`` per loop iteration (``loop.call_soon``
before control goes back to the selector). A run start writes the buffer at once, with its
own line: the job's code runs right after it in the same task step (an inline run), and must
not run before its line is with the kernel. A tick handled without a run (a skip) waits for
the end of the iteration: until then nothing outside the process can tell that it happened,
so a ``kill -9`` before that write is the same as one just before the tick was handled."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import structlog

from taskd.state.endline import replay_ends
from taskd.state.journal import MAX_AHEAD, MAX_REPLAY_RUNS, Replay, TickJournal

log = structlog.get_logger("taskd.state")

__all__ = ["SECOND_SUFFIX", "TickLog"]

SECOND_SUFFIX = ".1"  # ticks.journal.1: the file that takes turns with ticks.journal


class TickLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._files = (TickJournal(path), TickJournal(Path(str(path) + SECOND_SUFFIX)))
        self._active = 0  # index of the file appended to
        self._cut_from: TickJournal | None = None  # cut, not yet emptied
        self._dirty = [False, False]  # written since last emptied
        self._lock = threading.Lock()  # the loop's writes against the writer's cut
        self._buffer: list[str] = []
        self._flush_scheduled = False

    @property
    def errors(self) -> int:
        return self._files[0].errors + self._files[1].errors

    def open(self) -> Replay:
        """Open both files; what earlier processes left in them, merged."""
        first = self._files[0].open()
        try:
            second = self._files[1].open()
        except BaseException:
            self._files[0].close()
            raise
        for job, tick in second.ticks.items():
            if tick > first.ticks.get(job, -1.0):
                first.ticks[job] = tick
        for job, (at, paused) in second.paused.items():
            if at > first.paused.get(job, (-1.0, False))[0]:
                first.paused[job] = (at, paused)
        first.runs.extend(second.runs)
        first.ends.update(second.ends)
        first.bad_lines += second.bad_lines
        first.runs_dropped += second.runs_dropped
        if len(first.runs) > MAX_REPLAY_RUNS or len(first.ends) > MAX_REPLAY_RUNS:
            first.trim()
        return first

    def replay_into(self, db: sqlite3.Connection) -> None:
        """At open, before the writer starts: fold what the journal holds (ticks, run starts
        and ends, pauses not yet committed when the last daemon died) into the database, then
        empty it."""
        replay = self.open()
        if not (replay.ticks or replay.runs or replay.paused or replay.ends):
            self.reset_all()
            return
        db.execute("BEGIN")
        # Never back, unless what is stored is not a time at all (inf, text, out of range):
        # then the journal's checked tick replaces it rather than being lost behind it.
        db.executemany(
            "INSERT INTO jobs (name, last_tick) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
            "last_tick = CASE WHEN typeof(jobs.last_tick) IN ('real', 'integer') "
            "AND jobs.last_tick BETWEEN excluded.last_tick AND ? "
            "THEN jobs.last_tick ELSE excluded.last_tick END",
            [(job, tick, time.time() + MAX_AHEAD) for job, tick in replay.ticks.items()],
        )
        db.executemany(
            "INSERT INTO jobs (name, paused) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET paused=excluded.paused",
            [(job, paused) for job, (_, paused) in replay.paused.items()],
        )
        db.executemany(
            "INSERT OR IGNORE INTO runs (run_id, job, scheduled, started, outcome, trigger) "
            "VALUES (?, ?, ?, ?, 'running', ?)",
            replay.runs,
        )
        replay_ends(db, list(replay.ends.values()))
        db.execute("COMMIT")
        self.reset_all()
        log.info(
            "journal_replayed",
            ticks=len(replay.ticks),
            runs=len(replay.runs),
            ends=len(replay.ends),
            paused=len(replay.paused),
        )

    # -- the loop thread ---------------------------------------------------------------------

    # Job names are checked by the store before they get here (journal._check_name).

    def tick(self, job: str, tick: float) -> None:
        self._append(f"T\t{job}\t{tick!r}\n")

    def run_finished(self, line: str) -> None:
        """A run's end (an E line, taskd.state.endline), with the iteration's write like a
        tick (no write of its own): the run's ``run`` log line goes out at the end of the same
        iteration, so a kill after that line was seen finds the end on record (short of one
        in the microseconds between the two writes)."""
        self._append(line)

    def _append(self, line: str) -> None:
        self._buffer.append(line)
        if not self._flush_scheduled:
            loop = asyncio._get_running_loop()
            if loop is None:
                self.flush()  # no loop (tools, tests): at once
                return
            self._flush_scheduled = True
            loop.call_soon(self._flush_from_loop)

    def run_started(
        self, run_id: str, job: str, scheduled: float, started: float, trigger: str
    ) -> None:
        """Written at once, with whatever ticks wait in the buffer: the run is about to start."""
        self._buffer.append(f"R\t{run_id}\t{job}\t{scheduled!r}\t{started!r}\t{trigger}\n")
        self.flush()

    def tick_and_run_started(
        self, job: str, tick: float, run_id: str, started: float, trigger: str
    ) -> None:
        """A tick and the start of its run, written at once in one write(2), in the order
        ``tick`` then ``run_started`` would write them: the run is about to start, so
        nothing is left for the end of the iteration (no flush scheduled only to find the
        buffer empty)."""
        self._buffer.append(f"T\t{job}\t{tick!r}\n")
        self._buffer.append(f"R\t{run_id}\t{job}\t{tick!r}\t{started!r}\t{trigger}\n")
        self.flush()

    def paused(self, job: str, paused: bool, at: float) -> None:
        """Written at once: a pause is answered to whoever asked for it right after."""
        self._buffer.append(f"P\t{job}\t{int(paused)}\t{at!r}\n")
        self.flush()

    def _flush_from_loop(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = "".join(self._buffer)
        self._buffer.clear()
        with self._lock:
            self._dirty[self._active] = True
            self._files[self._active].write(data)

    # -- the writer thread -------------------------------------------------------------------

    def cut(self) -> None:
        """Before draining the queue for a commit: new lines go to the other file. Not while
        an earlier cut's file waits to be emptied (its commit failed): that file holds lines
        of rows not yet committed, so it stays as it is, and new lines keep going to the
        file appended to now."""
        if self._cut_from is not None:
            return
        with self._lock:
            if not self._dirty[self._active]:
                return
            self._cut_from = self._files[self._active]
            self._active ^= 1

    def committed(self) -> None:
        """The commit after the last cut succeeded: every line in the file cut from is in the
        database; empty it."""
        cut, self._cut_from = self._cut_from, None
        if cut is not None:
            cut.reset()
            self._dirty[self._files.index(cut)] = False

    def reset_all(self) -> None:
        """Everything in both files is in the database (after replay, after the last commit
        at a stop, when the loop no longer appends): empty both."""
        with self._lock:
            for f in self._files:
                f.reset()
            self._dirty = [False, False]
            self._cut_from = None

    def close(self) -> None:
        for f in self._files:
            f.close()
