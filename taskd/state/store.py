"""Persistence under ``state_dir``: each job's last tick and outcome, the run history, the shared
state. SQLite in WAL mode: a ``kill -9`` at any instant leaves the file readable and holding
everything up to the last commit.

The event loop never waits for the disk: writes are handed to the state writer's thread
(taskd.state.writer), which commits them in groups and checkpoints; not even a burst's
commit is waited for (measured: no win, see the README). What must be on record before a run
starts (its tick, and that it started), and a run's end, goes to the tick journal first
(taskd.state.ticklog), one write(2) per loop iteration or per run start, so a crash neither
runs a recorded tick again, nor forgets a run that started, nor how one that ended did."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from taskd.errors import StateError
from taskd.state import files
from taskd.state.dbfile import (
    ForeignDatabase,
    connect,
    describe,
    foreign_database,
    is_corrupt,
    is_io_error,
    move_aside,
)
from taskd.state.endline import end_line
from taskd.state.identify import foreign_reason
from taskd.state.journal import _check_name
from taskd.state.reads import read_history, read_jobs, read_shared
from taskd.state.retention import Retention, count_runs
from taskd.state.rows import JobRow
from taskd.state.schema import prepare
from taskd.state.ticklog import TickLog
from taskd.state.waits import CommitWaits
from taskd.state.writer import (
    FINISHED,
    PAUSED,
    RETENTION,
    RUN,
    SHARED,
    TICK,
    Writer,
)
from taskd.state.writes import (
    MAX_RESULT_CHARS,
    MAX_RUN_RESULT_CHARS,
    bounded,
    storable,
)

__all__ = ["MAX_RESULT_CHARS", "MAX_RUN_RESULT_CHARS", "JobRow", "StateStore"]

log = structlog.get_logger("taskd.state")


class StateStore(CommitWaits):
    """One SQLite file. Its methods are called from the event-loop thread (or from a thread
    with no loop: tools and tests, where each write is committed before it returns); the
    connection belongs to the state writer's thread once the store is open."""

    def __init__(self, path: Path, retention: Retention | None = None) -> None:
        self.path = path
        self._retention = retention or Retention()
        self._db: sqlite3.Connection | None = None
        super().__init__()
        self.journal = TickLog(path.parent / "ticks.journal")
        # Names already checked (journal._check_name): a name is checked when it first comes
        # to the store, not on each of the three writes of every run (a regex each, 3% of a
        # run's CPU). Bounded by the names ever configured.
        self._names: set[str] = set()

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed). A damaged file is moved aside with a loud error and a
        new one started, never overwritten in place; another program's SQLite file, or one
        of a newer taskd, is refused (StateError) and left as it was."""
        try:
            # Created 0700 if missing; refused if others own or can write it (trust.py).
            files.prepare_dir(self.path.parent)
            self._db = self._open_db()
        except OSError as exc:  # StateError included
            if isinstance(exc, StateError):
                raise
            raise StateError(
                f"cannot open state database {self.path}: {describe(exc, where=self.path.parent)}"
            ) from exc
        try:
            self.journal.replay_into(self._db)
            interrupted = self._db.execute(
                "UPDATE runs SET outcome='interrupted', error='the daemon stopped during this run' WHERE outcome='running'"
            ).rowcount
            writer = Writer(
                self._db,
                self.path,
                self.journal,
                self._retention,
                count_runs(self._db),
                self._on_cycle,
            )
            # One pass over rows past the limits now (READY must not wait for more); the
            # rest on the writer's thread, or at once when no loop is there to hold up.
            writer.backlog.begin()
            if asyncio._get_running_loop() is None:
                while writer.backlog.due:
                    writer.backlog.step()
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            self._db = None
            self.journal.close()
            if isinstance(exc, StateError):  # a refused journal file: says what to do itself
                raise
            what = (
                "the tick journal " + str(self.journal.path)
                if isinstance(exc, OSError)
                else f"state database {self.path}"
            )
            hint = "" if is_io_error(exc) else " (is another program holding it open for writing?)"
            raise StateError(
                f"cannot write {what}: {describe(exc, where=self.path.parent)}{hint}"
            ) from exc
        writer.start()
        self._writer = writer
        if interrupted:
            log.warning(
                "runs_interrupted",
                count=interrupted,
                hint="these runs were going when the daemon died",
            )

    def _open_db(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except ForeignDatabase:
            raise  # not ours: not moved, not written
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                # Locked by another program, no permission, an I/O error, a full disk: not
                # damage. Moving a good file aside would lose every cursor and pause flag.
                raise StateError(
                    f"cannot open state database {self.path}: {describe(exc, where=self.path.parent)}"
                ) from exc
            aside = move_aside(self.path, "corrupt")
            log.error(
                "state_corrupt",
                path=str(self.path),
                moved_to=str(aside),
                error=str(exc),
                action="started with empty state; the old file is kept for inspection",
            )
            try:
                return self._connect()
            except sqlite3.DatabaseError as exc2:
                raise StateError(
                    f"cannot create state database {self.path}: {describe(exc2, where=self.path.parent)}"
                ) from exc2

    def _connect(self) -> sqlite3.Connection:
        # SQLite opens the files by path and follows a symlink there: check them first.
        files.prepare_database(self.path)
        # Whose file it is, before a connection that can write (taskd.state.identify).
        reason = foreign_reason(self.path)
        if reason is not None:
            raise foreign_database(self.path, reason)
        db = connect(self.path)
        try:
            prepare(db, self.path)
        except BaseException:
            db.close()
            raise
        return db

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError("state store is not open")
        return self._db

    # -- retention -------------------------------------------------------------------------

    @property
    def retention(self) -> Retention:
        return self._retention

    @retention.setter
    def retention(self, retention: Retention) -> None:
        """A reload changes it; a lowered limit is applied in passes from now on."""
        self._retention = retention
        if self._writer is not None:
            self._writer.submit((RETENTION, retention))

    # -- state of the writes ---------------------------------------------------------------

    @property
    def failing(self) -> bool:
        """Commits are failing (the writer keeps the rows and retries)."""
        return self._writer is not None and self._writer.failing

    @property
    def write_errors(self) -> int:
        return 0 if self._writer is None else self._writer.write_errors

    # -- reads: on the writer's thread, after every write queued before them --------------

    def _read(self, fn: Callable[[Writer], Any]) -> Any:
        if self._writer is None:
            raise StateError("state store is not open")
        self.journal.flush()
        return self._writer.call(fn)

    def jobs(self) -> dict[str, JobRow]:
        """Every job's row, including writes kept in memory while commits fail; each stored
        value checked (taskd.state.rows)."""
        rows: dict[str, JobRow] = self._read(read_jobs)
        return rows

    def shared(self) -> dict[str, Any]:
        return dict(self._read(read_shared))

    def history(self, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._read(lambda w: read_history(w.db, job, limit))
        return rows

    # -- writes: queued for the writer ------------------------------------------------------

    def _admit(self, job: str) -> None:
        """Check a name new to the store (ValueError if it must not reach the journal)."""
        _check_name(job)
        self._names.add(job)

    def set_tick(self, job: str, tick: float) -> None:
        """Record the job's cursor: on record at once (the journal, written before this loop
        iteration ends or the next run starts), in the database with the writer's next
        commit."""
        w = self._writer
        if w is None:
            return  # closed: a run that unwound after the stop
        if job not in self._names:
            self._admit(job)
        # Queued before its journal line is written: a commit that empties the journal file
        # holding the line has this row in it (taskd.state.ticklog).
        w.submit((TICK, job, tick))
        self.journal.tick(job, tick)
        if asyncio._get_running_loop() is None:
            self.flush()  # outside a loop (tools, tests): written through

    def set_paused(self, job: str, paused: bool) -> None:
        """On record at once (the journal): ``taskd pause`` answers right after."""
        w = self._writer
        if w is None:
            return
        if job not in self._names:
            self._admit(job)
        w.submit((PAUSED, job, paused))
        self.journal.paused(job, paused, time.time())
        self._through()

    def run_started(
        self, run_id: str, job: str, scheduled: float, started: float, trigger: str
    ) -> None:
        w = self._writer
        if w is None:
            return
        if job not in self._names:
            self._admit(job)
        w.submit(_running(run_id, job, scheduled, started, trigger))
        # With the kernel before this returns, and so before the job's code runs.
        self.journal.run_started(run_id, job, scheduled, started, trigger)
        self._through()

    def tick_and_run_started(
        self, job: str, tick: float, run_id: str, started: float, trigger: str
    ) -> None:
        """``set_tick(job, tick)`` and ``run_started`` of a run for that tick, at once: the
        scheduler's fused path (one write(2) for both lines, no flush left for later)."""
        w = self._writer
        if w is None:
            return
        if job not in self._names:
            self._admit(job)
        # Both queued before their lines are written, as in set_tick (taskd.state.ticklog).
        w.submit((TICK, job, tick))
        w.submit(_running(run_id, job, tick, started, trigger))
        self.journal.tick_and_run_started(job, tick, run_id, started, trigger)
        self._through()

    def run_finished(
        self,
        run_id: str,
        job: str,
        scheduled: float,
        started: float,
        attempts: int,
        duration: float,
        outcome: str,
        error: str | None,
        trigger: str,
        result_json: str | None = None,
        failures: int = 0,
    ) -> None:
        """``failures``: the job's consecutive failed runs, this one included. On record with
        the journal's next write too (an E line, taskd.state.endline): a kill before the
        writer's commit must not leave the run ``interrupted`` in the history."""
        w = self._writer
        if w is None:
            return  # closed: its line is logged; its row is not
        if job not in self._names:
            self._admit(job)
        error, result_json = storable(error), storable(result_json)
        row = (
            run_id,
            job,
            scheduled,
            started,
            attempts,
            duration,
            outcome,
            error,
            trigger,
            bounded(result_json, MAX_RUN_RESULT_CHARS),
        )
        w.submit(
            (
                FINISHED,
                run_id,
                row,
                job,
                (
                    run_id,
                    outcome,
                    started,
                    duration,
                    error,
                    bounded(result_json),
                    failures,
                    started + duration if outcome == "succeeded" else None,
                ),
            )
        )
        # Queued before its line is written, as a tick (taskd.state.ticklog).
        self.journal.run_finished(end_line(row, failures))
        self._through()

    def set_shared(self, data: Mapping[str, Any], keys: frozenset[str]) -> None:
        w = self._writer
        if w is None:
            return
        for key in keys:
            # The value's JSON is ASCII; a key is stored as it is, and must be UTF-8.
            w.submit((SHARED, storable(key) or key, json.dumps(data[key]) if key in data else None))
        self._through()

    def _through(self) -> None:
        if asyncio._get_running_loop() is None:
            self.flush()  # outside a loop (tools, tests): written through

    def flush(self) -> None:
        """Commit everything written so far, now; raises the commit's error if it fails."""
        if self._writer is not None:
            self.journal.flush()
            self._writer.call(_nothing, strict=True)

    def close(self, wait: float = 0.0) -> None:
        """Commit what is queued, checkpoint (the -wal emptied), close. Rows past the
        retention limits that are left go after the next start: a stop must not wait. A
        disk that refuses the last commit is waited for up to ``wait`` seconds, then
        StateNotSaved is raised (see Writer.close)."""
        w, self._writer = self._writer, None
        try:
            if w is not None:
                self.journal.flush()
                w.close(wait)
        finally:
            self._db = None
            self.journal.close()
            self._release()


def _running(
    run_id: str, job: str, scheduled: float, started: float, trigger: str
) -> tuple[Any, ...]:
    """The writer's op for a run that started: its history row, as "running"."""
    return (RUN, run_id, (run_id, job, scheduled, started, 1, None, "running", None, trigger, None))


def _nothing(_: Writer) -> None:
    return None
