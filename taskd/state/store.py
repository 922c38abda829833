"""Persistence under ``state_dir``: each job's last tick and outcome, the run history, the shared
state. SQLite in WAL mode: a ``kill -9`` at any instant leaves the file readable and holding
everything up to the last commit.

Writes are buffered and committed once per event-loop iteration (a burst of 10,000 runs due
at the same instant is one transaction, not 10,000). What must be on record before a run
starts (its tick, and that it started) also goes to the tick journal at once, one write(2)
each (see taskd.state.journal), so a run never waits for a commit."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Mapping
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
    rollback,
)
from taskd.state.identify import foreign_reason
from taskd.state.journal import MAX_AHEAD, TickJournal
from taskd.state.retention import Backlog, Pruned, Retention, count_runs
from taskd.state.rows import JOB_COLUMNS, JobRow, RowChecker
from taskd.state.schema import prepare
from taskd.state.writes import (
    MAX_RESULT_CHARS,
    MAX_RUN_RESULT_CHARS,
    Pending,
    bounded,
    storable,
)

__all__ = ["MAX_RESULT_CHARS", "MAX_RUN_RESULT_CHARS", "JobRow", "StateStore"]

log = structlog.get_logger("taskd.state")

MAX_BUFFERED_RUNS = 100_000  # history rows kept in memory while the database is failing


class StateStore:
    """One SQLite file, used only from the event-loop thread."""

    def __init__(self, path: Path, retention: Retention | None = None) -> None:
        self.path = path
        self._retention = retention or Retention()
        self._run_count = 0  # rows in the runs table, as of the last commit
        # Rows past the retention limits that commits left (taskd.state.retention).
        self._backlog = Backlog(self._prune_pass, self._prune_failed)
        self._io_failed = False  # the disk failed a read or write since the file was opened
        self._db: sqlite3.Connection | None = None
        self._pending = Pending()
        self._waiters: list[asyncio.Future[None]] = []
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self.journal = TickJournal(path.parent / "ticks.journal")
        self._journaled = False
        self.write_errors = 0
        self.failing = False

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
            self._replay_journal()
            interrupted = self._db.execute(
                "UPDATE runs SET outcome='interrupted', error='the daemon stopped during this run' WHERE outcome='running'"
            ).rowcount
            self._run_count = count_runs(self._db)
            self._backlog.begin()
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

    # -- retention -------------------------------------------------------------------------

    @property
    def retention(self) -> Retention:
        return self._retention

    @retention.setter
    def retention(self, retention: Retention) -> None:
        """A reload changes it; a lowered limit is applied in passes from now on."""
        self._retention = retention
        if self._db is not None:
            self._backlog.due = True
            self._backlog.schedule()

    def _prune_pass(self) -> tuple[int, Pruned]:
        """One bounded pass over rows past the limits, in its own transaction."""
        db = self.db
        if self.failing:
            # The retried flush prunes once writes work again; its success reschedules.
            raise sqlite3.OperationalError("state writes are failing")
        db.execute("BEGIN")
        try:
            done = self._retention.prune_for(db, self._run_count, time.time())
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        before, self._run_count = self._run_count, done.count
        return before, done

    def _prune_failed(self, exc: Exception) -> None:
        if self.failing:
            return  # said every second already
        # Not the runs' writes: the next good commit reschedules the pass.
        log.warning(
            "history_prune_failed",
            path=str(self.path),
            error=describe(exc, where=self.path.parent, after_io_error=self._io_failed),
            retry="after the next commit",
        )

    def _replay_journal(self) -> None:
        """Fold what the journal holds (ticks and run starts not yet committed when the last
        daemon died) into the database, then empty it."""
        replay = self.journal.open()
        if not (replay.ticks or replay.runs):
            self.journal.reset()
            return
        db = self.db
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
            "INSERT OR IGNORE INTO runs (run_id, job, scheduled, started, outcome, trigger) "
            "VALUES (?, ?, ?, ?, 'running', ?)",
            replay.runs,
        )
        db.execute("COMMIT")
        self.journal.reset()
        log.info("journal_replayed", ticks=len(replay.ticks), runs=len(replay.runs))

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

    # -- reads -----------------------------------------------------------------------------

    def jobs(self) -> dict[str, JobRow]:
        """Every job's row, including writes still buffered for this loop iteration; each
        stored value checked (taskd.state.rows)."""
        out: dict[str, JobRow] = {}
        checker = RowChecker(self.path, time.time())
        for row in self.db.execute(f"SELECT {JOB_COLUMNS} FROM jobs"):
            checked = checker.row(row)
            if checked is not None:
                out[checked.name] = checked
        for name, tick in self._pending.ticks.items():
            out.setdefault(name, JobRow(name)).last_tick = tick
        for name, paused in self._pending.paused.items():
            out.setdefault(name, JobRow(name)).paused = paused
        for name, (
            run_id,
            outcome,
            started,
            duration,
            error,
            _,
            failures,
            success,
        ) in self._pending.job_last.items():
            r = out.setdefault(name, JobRow(name))
            r.last_run_id, r.last_outcome, r.last_started = run_id, outcome, started
            r.last_duration, r.last_error, r.failures = duration, error, failures
            r.last_success = success if success is not None else r.last_success
        return out

    def shared(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM shared")}

    def history(self, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT run_id, job, scheduled, started, attempts, duration, outcome, error, trigger FROM runs"
        args: tuple[Any, ...] = ()
        if job is not None:
            sql += " WHERE job = ?"
            args = (job,)
        sql += " ORDER BY seq DESC LIMIT ?"
        cols = (
            "run_id",
            "job",
            "scheduled",
            "started",
            "attempts",
            "duration",
            "outcome",
            "error",
            "trigger",
        )
        return [dict(zip(cols, r, strict=True)) for r in self.db.execute(sql, (*args, limit))]

    # -- buffered writes -------------------------------------------------------------------

    def set_tick(self, job: str, tick: float) -> None:
        """Record the job's cursor. On record at once (journal), in the database at the end
        of this loop iteration."""
        self.journal.tick(job, tick)
        self._journaled = True
        self._pending.ticks[job] = tick
        self._dirty()

    def set_paused(self, job: str, paused: bool) -> None:
        self._pending.paused[job] = paused
        self._dirty()

    def run_started(
        self, run_id: str, job: str, scheduled: float, started: float, trigger: str
    ) -> None:
        self.journal.run_started(run_id, job, scheduled, started, trigger)
        self._journaled = True
        self._pending.runs[run_id] = (
            run_id,
            job,
            scheduled,
            started,
            1,
            None,
            "running",
            None,
            trigger,
            None,
        )
        self._dirty()

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
        """``failures``: the job's consecutive failed runs, this one included."""
        error, result_json = storable(error), storable(result_json)
        self._pending.runs[run_id] = (
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
        self._pending.job_last[job] = (
            run_id,
            outcome,
            started,
            duration,
            error,
            bounded(result_json),
            failures,
            started + duration if outcome == "succeeded" else None,
        )
        self._dirty()

    def set_shared(self, data: Mapping[str, Any], keys: frozenset[str]) -> None:
        for key in keys:
            # The value's JSON is ASCII; a key is stored as it is, and must be UTF-8.
            self._pending.shared[storable(key) or key] = (
                json.dumps(data[key]) if key in data else None
            )
        self._dirty()

    def _dirty(self) -> None:
        if self._db is None:
            # Closed: a run that unwound after the stop. Its line is logged; its row is not.
            self._pending.clear()
            return
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # outside a loop (CLI tools): write through
                return
            self._flush_handle = loop.call_soon(self._flush_from_loop)

    async def durable(self) -> None:
        """Return once everything written so far is committed (at once while writes are
        failing: the runs go on, the store keeps retrying)."""
        if self._flush_handle is None or self.failing:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _flush_from_loop(self) -> None:
        self._flush_handle = None
        try:
            self.flush()
        except (sqlite3.Error, OSError) as exc:
            self._io_failed = self._io_failed or is_io_error(exc)
            self.write_errors += 1
            self.failing = True
            # Keep the buffered writes and try again shortly. Runs waiting for durability go
            # on regardless: a full disk must not stop every job, and the error is loud.
            log.error(
                "state_write_failed",
                path=str(self.path),
                error=describe(exc, where=self.path.parent, after_io_error=self._io_failed),
                retry_in="1s",
                hint="runs continue; state and history are kept in memory until the write succeeds",
            )
            if len(self._pending.runs) > MAX_BUFFERED_RUNS:
                # Memory is not a place to keep history forever while the disk is failing.
                rows = list(self._pending.runs.items())
                drop = len(rows) - MAX_BUFFERED_RUNS // 2
                self._pending.runs = dict(rows[drop:])
                log.error("history_dropped", runs=drop, reason="state writes keep failing")
            self._flush_handle = asyncio.get_running_loop().call_later(1.0, self._flush_from_loop)
        else:
            if self.failing:
                log.warning("state_write_recovered", path=str(self.path))
            self.failing = False
            self._backlog.schedule()
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def flush(self) -> None:
        if not self._pending:
            return
        db = self.db
        db.execute("BEGIN")
        try:
            added = self._pending.write(db)
            # As many as were added, at most: exact at steady state, and a commit never
            # costs more than its own writes did; a backlog goes in passes (above).
            done = self._retention.prune(db, self._run_count + added, time.time(), added)
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        self._run_count = done.count
        self._backlog.note(done)
        if self._journaled:
            self.journal.reset()
            self._journaled = False
        self._pending.clear()

    def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        # What is left goes after the next start: a stop must not wait for it.
        self._backlog.cancel()
        if self._db is not None:
            try:
                self.flush()
            finally:
                self._db.close()
                self._db = None
                self.journal.close()
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
