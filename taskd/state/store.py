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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from taskd.config.load import JOB_NAME
from taskd.errors import StateError
from taskd.run.events import Outcome
from taskd.state import files
from taskd.state.journal import MAX_AHEAD, TickJournal, time_problem

log = structlog.get_logger("taskd.state")

SCHEMA_VERSION = 2
HISTORY_KEEP = 100_000  # rows; older runs are pruned
MAX_RESULT_CHARS = 65_536  # a job's last result
# Each history row keeps less: 100,000 rows of 64 KB would be 6.4 GB of disk.
MAX_RUN_RESULT_CHARS = 8_192
MAX_BUFFERED_RUNS = 100_000  # history rows kept in memory while the database is failing
_OUTCOMES = frozenset(o.value for o in Outcome)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    last_tick REAL,
    paused INTEGER NOT NULL DEFAULT 0,
    last_run_id TEXT, last_outcome TEXT, last_started REAL, last_duration REAL,
    last_error TEXT, last_result TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    last_success REAL
);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    job TEXT NOT NULL,
    scheduled REAL NOT NULL,
    started REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    duration REAL,
    outcome TEXT NOT NULL,
    error TEXT,
    trigger TEXT NOT NULL DEFAULT 'schedule',
    result TEXT
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, seq);
CREATE TABLE IF NOT EXISTS shared (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(slots=True)
class JobRow:
    name: str
    last_tick: float | None = None
    paused: bool = False
    last_run_id: str | None = None
    last_outcome: str | None = None
    last_started: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    last_result: Any = None
    failures: int = 0  # consecutive failed runs up to the last one
    last_success: float | None = None  # when the job's latest successful run ended


def _bounded(result_json: str | None, limit: int = MAX_RESULT_CHARS) -> str | None:
    """A stored result of at most ``limit`` characters of JSON; a longer one is kept as a
    JSON string holding its cut text, which says so."""
    if result_json is not None and len(result_json) > limit:
        return json.dumps(result_json[:limit] + "...(truncated)")
    return result_json


# Each step takes a database of the version before it to the next one.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (
        "ALTER TABLE runs ADD COLUMN result TEXT",
        "ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN last_success REAL",
        "UPDATE jobs SET last_success = last_started + COALESCE(last_duration, 0) "
        "WHERE last_outcome = 'succeeded'",
        # Schema 1 kept no streak: a job whose last run failed has failed at least once.
        "UPDATE jobs SET failures = 1 WHERE last_outcome IN ('failed', 'timed_out', 'interrupted')",
    ),
}


class _CorruptError(sqlite3.DatabaseError):
    """PRAGMA quick_check found damage."""


_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, _CorruptError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


class StateStore:
    """One SQLite file, used only from the event-loop thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._ticks: dict[str, float] = {}
        self._paused: dict[str, bool] = {}
        self._run_rows: dict[str, tuple[Any, ...]] = {}
        self._job_last: dict[str, tuple[Any, ...]] = {}
        self._shared: dict[str, str | None] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._flushes = 0
        self.journal = TickJournal(path.parent / "ticks.journal")
        self._journaled = False
        self.write_errors = 0
        self.failing = False

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed). A file that is not a readable taskd database is moved
        aside with a loud error and a new one started: never overwritten in place."""
        files.prepare_dir(self.path.parent)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                # Locked by another program, no permission, an I/O error: not corruption.
                # Moving a good file aside would lose every cursor and pause flag.
                raise StateError(f"cannot open state database {self.path}: {exc}") from exc
            aside = self._move_aside()
            log.error(
                "state_corrupt",
                path=str(self.path),
                moved_to=str(aside),
                error=str(exc),
                action="started with empty state; the old file is kept for inspection",
            )
            try:
                self._db = self._connect()
            except sqlite3.DatabaseError as exc2:
                raise StateError(f"cannot create state database {self.path}: {exc2}") from exc2
        try:
            self._replay_journal()
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
            raise StateError(
                f"cannot replay {what}: {exc} (is another program holding the database open for writing?)"
            ) from exc
        try:
            interrupted = self._db.execute(
                "UPDATE runs SET outcome='interrupted', error='the daemon stopped during this run' WHERE outcome='running'"
            ).rowcount
        except sqlite3.Error as exc:
            self._db.close()
            self._db = None
            self.journal.close()
            raise StateError(
                f"cannot write state database {self.path}: {exc} "
                "(is another program holding it open for writing?)"
            ) from exc
        if interrupted:
            log.warning(
                "runs_interrupted",
                count=interrupted,
                hint="these runs were going when the daemon died",
            )

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while any(Path(str(aside) + s).exists() for s in ("", "-wal", "-shm")):
            # Never replace an earlier copy: each was kept for someone to look at.
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
        except OSError as exc:
            raise StateError(
                f"state database {self.path} is corrupt and cannot be moved aside ({exc}); "
                f"move it away by hand"
            ) from exc
        return aside

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
        # A short busy timeout: the connection is used on the event loop, and another program
        # holding a lock must cost a failed (retried) flush, not a 5 s stall of every job.
        db = sqlite3.connect(self.path, timeout=0.25, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process being killed (the OS has it);
            # only a power loss can drop the last commits, never corrupt the file.
            db.execute("PRAGMA synchronous=NORMAL")
            check = db.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise _CorruptError(f"integrity check failed: {check[0] if check else 'no answer'}")
            has_tables = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            row = (
                db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if has_tables
                else None
            )
            if row is None:
                db.executescript(_SCHEMA)
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.path} has schema {row[0]}, newer than this taskd ({SCHEMA_VERSION}); "
                    "upgrade taskd or use another state_dir"
                )
            elif int(row[0]) < SCHEMA_VERSION:
                self._migrate(db, int(row[0]))
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        """Bring an older database up to SCHEMA_VERSION in one transaction: a crash midway
        leaves the old version, which the next start migrates again."""
        db.execute("BEGIN")
        try:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for sql in _MIGRATIONS[step]:
                    db.execute(sql)
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info(
            "state_migrated", path=str(self.path), from_schema=version, to_schema=SCHEMA_VERSION
        )

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError("state store is not open")
        return self._db

    # -- reads -----------------------------------------------------------------------------

    def jobs(self) -> dict[str, JobRow]:
        """Every job's row, including writes still buffered for this loop iteration.

        What the database holds is checked before use (another program, a disk error or an
        older bug may have put anything there): a value that is not what taskd writes is
        logged as ``state_value_invalid`` and read as absent, so the job starts as if new in
        that respect (no cursor: it starts from now) instead of crashing the start."""
        out: dict[str, JobRow] = {}
        now = time.time()
        for row in self.db.execute(
            "SELECT name, last_tick, paused, last_run_id, last_outcome, last_started, last_duration, last_error, last_result, failures, last_success FROM jobs"
        ):
            checked = self._checked_row(row, now)
            if checked is not None:
                out[checked.name] = checked
        for name, tick in self._ticks.items():
            out.setdefault(name, JobRow(name)).last_tick = tick
        for name, paused in self._paused.items():
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
        ) in self._job_last.items():
            r = out.setdefault(name, JobRow(name))
            r.last_run_id, r.last_outcome, r.last_started = run_id, outcome, started
            r.last_duration, r.last_error, r.failures = duration, error, failures
            r.last_success = success if success is not None else r.last_success
        return out

    def _checked_row(self, row: tuple[Any, ...], now: float) -> JobRow | None:
        """A ``jobs`` row as a JobRow, each value checked; None for a name no job can have."""
        name = row[0]
        if not isinstance(name, str) or not JOB_NAME.fullmatch(name):
            # The config refuses such a name, so no configured job can be meant.
            self._invalid(repr(name)[:100], "name", name, "not a valid job name", "row ignored")
            return None
        last_tick = self._time(name, "last_tick", row[1], now)
        last_started = self._time(name, "last_started", row[5], now)
        last_success = self._time(name, "last_success", row[10], now)
        duration = row[6]
        if duration is not None and not (
            isinstance(duration, int | float)
            and not isinstance(duration, bool)
            and 0 <= duration <= MAX_AHEAD  # False for nan too
        ):
            self._invalid(name, "last_duration", duration, "not a duration of 0 to 10 years")
            duration = None
        paused = row[2]
        if paused not in (0, 1) or isinstance(paused, float):
            self._invalid(name, "paused", paused, "not 0 or 1", "read as not paused")
            paused = 0
        # The two go together: without either, the job has no last run to show.
        run_id, outcome = row[3], row[4]
        if not isinstance(run_id, str | None):
            self._invalid(name, "last_run_id", run_id, "not text")
            run_id = outcome = None
        elif outcome is not None and outcome not in _OUTCOMES:
            self._invalid(name, "last_outcome", outcome, "not a run outcome")
            run_id = outcome = None
        error = row[7]
        if not isinstance(error, str | None):
            self._invalid(name, "last_error", error, "not text")
            error = None
        result: Any = None
        if row[8] is not None:
            try:
                if not isinstance(row[8], str):
                    raise TypeError(f"{type(row[8]).__name__}, not text")
                result = json.loads(row[8])
            except (ValueError, TypeError, RecursionError) as exc:
                self._invalid(name, "last_result", row[8], f"not JSON: {exc}")
        failures = row[9]
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
            self._invalid(name, "failures", failures, "not a count")
            failures = 0
        return JobRow(
            name,
            last_tick,
            bool(paused),
            run_id,
            outcome,
            last_started,
            duration,
            error,
            result,
            failures,
            last_success,
        )

    def _time(self, job: str, column: str, value: object, now: float) -> float | None:
        if value is None:
            return None
        problem = time_problem(value, now)
        if problem is not None:
            self._invalid(job, column, value, problem)
            return None
        assert isinstance(value, int | float)  # time_problem checked it
        return float(value)

    def _invalid(
        self, job: str, column: str, value: object, problem: str, action: str = "ignored"
    ) -> None:
        log.warning(
            "state_value_invalid",
            job=job,
            field=column,
            value=repr(value)[:200],
            problem=problem,
            source=f"state database {self.path}, table jobs",
            action=action,
        )

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
        self._ticks[job] = tick
        self._dirty()

    def set_paused(self, job: str, paused: bool) -> None:
        self._paused[job] = paused
        self._dirty()

    def run_started(
        self, run_id: str, job: str, scheduled: float, started: float, trigger: str
    ) -> None:
        self.journal.run_started(run_id, job, scheduled, started, trigger)
        self._journaled = True
        self._run_rows[run_id] = (
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
        self._run_rows[run_id] = (
            run_id,
            job,
            scheduled,
            started,
            attempts,
            duration,
            outcome,
            error,
            trigger,
            _bounded(result_json, MAX_RUN_RESULT_CHARS),
        )
        self._job_last[job] = (
            run_id,
            outcome,
            started,
            duration,
            error,
            _bounded(result_json),
            failures,
            started + duration if outcome == "succeeded" else None,
        )
        self._dirty()

    def set_shared(self, data: Mapping[str, Any], keys: frozenset[str]) -> None:
        for key in keys:
            self._shared[key] = json.dumps(data[key]) if key in data else None
        self._dirty()

    def _dirty(self) -> None:
        if self._db is None:
            # Closed: a run that unwound after the stop. Its line is logged; its row is not.
            self._drop_buffers()
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
            self.write_errors += 1
            self.failing = True
            # Keep the buffered writes and try again shortly. Runs waiting for durability go
            # on regardless: a full disk must not stop every job, and the error is loud.
            log.error(
                "state_write_failed",
                path=str(self.path),
                error=str(exc),
                retry_in="1s",
                hint="runs continue; state and history are kept in memory until the write succeeds",
            )
            if len(self._run_rows) > MAX_BUFFERED_RUNS:
                # Memory is not a place to keep history forever while the disk is failing.
                rows = list(self._run_rows.items())
                drop = len(rows) - MAX_BUFFERED_RUNS // 2
                self._run_rows = dict(rows[drop:])
                log.error("history_dropped", runs=drop, reason="state writes keep failing")
            self._flush_handle = asyncio.get_running_loop().call_later(1.0, self._flush_from_loop)
        else:
            if self.failing:
                log.warning("state_write_recovered", path=str(self.path))
            self.failing = False
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def flush(self) -> None:
        if not (self._ticks or self._paused or self._run_rows or self._job_last or self._shared):
            return
        db = self.db
        db.execute("BEGIN")
        try:
            if self._ticks:
                db.executemany(
                    "INSERT INTO jobs (name, last_tick) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET last_tick=excluded.last_tick",
                    self._ticks.items(),
                )
            if self._paused:
                db.executemany(
                    "INSERT INTO jobs (name, paused) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET paused=excluded.paused",
                    self._paused.items(),
                )
            if self._run_rows:
                db.executemany(
                    "INSERT INTO runs (run_id, job, scheduled, started, attempts, duration, outcome, error, trigger, result) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET attempts=excluded.attempts, "
                    "duration=excluded.duration, outcome=excluded.outcome, error=excluded.error, "
                    "result=excluded.result",
                    self._run_rows.values(),
                )
            if self._job_last:
                db.executemany(
                    "INSERT INTO jobs (name, last_run_id, last_outcome, last_started, last_duration, last_error, last_result, failures, last_success) "
                    "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET last_run_id=excluded.last_run_id, "
                    "last_outcome=excluded.last_outcome, last_started=excluded.last_started, "
                    "last_duration=excluded.last_duration, last_error=excluded.last_error, "
                    "last_result=COALESCE(excluded.last_result, jobs.last_result), failures=excluded.failures, "
                    "last_success=COALESCE(excluded.last_success, jobs.last_success)",
                    [(job, *row) for job, row in self._job_last.items()],
                )
            if self._shared:
                db.executemany(
                    "DELETE FROM shared WHERE key=?",
                    [(k,) for k, v in self._shared.items() if v is None],
                )
                db.executemany(
                    "INSERT INTO shared (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    [(k, v) for k, v in self._shared.items() if v is not None],
                )
            self._flushes += 1
            if self._flushes % 1000 == 0:
                db.execute(
                    "DELETE FROM runs WHERE seq <= (SELECT MAX(seq) FROM runs) - ?", (HISTORY_KEEP,)
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if self._journaled:
            self.journal.reset()
            self._journaled = False
        self._drop_buffers()

    def _drop_buffers(self) -> None:
        self._ticks.clear()
        self._paused.clear()
        self._run_rows.clear()
        self._job_last.clear()
        self._shared.clear()

    def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
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
