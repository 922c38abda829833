"""The state database's tables, their version, and the ordered steps that bring an older
file up to date. A new column, index or table is one more Migration at the end of
MIGRATIONS (and the same change in _SCHEMA, which new files get); SCHEMA_VERSION follows.

Nothing is written before the file is known to be taskd's and not newer than this taskd:
another program's file is refused untouched, and a newer one is never downgraded."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import structlog

from taskd.errors import StateError
from taskd.state.dbfile import APPLICATION_ID, configure, foreign_database, identify, rollback

log = structlog.get_logger("taskd.state")

# 3: runs_started (history retention by age), application_id.
SCHEMA_VERSION = 3

# The tables of a new database (the latest schema); an older file is migrated to the same.
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
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
CREATE TABLE IF NOT EXISTS shared (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One step: takes a database of schema ``to - 1`` to schema ``to``."""

    to: int
    statements: tuple[str, ...]


# In order; each applied in its own transaction together with the version it reaches, so a
# crash (or a full disk) midway leaves the file at the last step completed.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        (
            "ALTER TABLE runs ADD COLUMN result TEXT",
            "ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN last_success REAL",
            "UPDATE jobs SET last_success = last_started + COALESCE(last_duration, 0) "
            "WHERE last_outcome = 'succeeded'",
            # Schema 1 kept no streak: a job whose last run failed has failed at least once.
            "UPDATE jobs SET failures = 1 "
            "WHERE last_outcome IN ('failed', 'timed_out', 'interrupted')",
        ),
    ),
    Migration(
        3,
        (
            "CREATE INDEX IF NOT EXISTS runs_started ON runs (started)",
            f"PRAGMA application_id = {APPLICATION_ID}",
        ),
    ),
)
assert [m.to for m in MIGRATIONS] == list(range(2, SCHEMA_VERSION + 1))


def prepare(db: sqlite3.Connection, path: Path) -> None:
    """Check what the file is, then create the tables in a new file or bring an older one
    up to SCHEMA_VERSION. Raises ForeignDatabase for another program's file and StateError
    for one written by a newer taskd; in both cases nothing has been written."""
    ident = identify(db)
    reason = ident.foreign_reason()
    if reason is not None:
        raise foreign_database(path, reason)
    version = 0
    if not ident.new:
        try:
            version = int(ident.schema or "")
        except ValueError:
            raise StateError(
                f"state database {path} has an unreadable schema version {ident.schema!r}; "
                f"move it away (mv {path} {path}.old) to start with empty state"
            ) from None
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state database {path} has schema {version}, newer than this taskd "
                f"({SCHEMA_VERSION}); it was written by a newer taskd and is not downgraded: "
                "run that taskd (or a newer one), or give this one another state_dir"
            )
        if version < 1:
            raise StateError(f"state database {path} has an impossible schema version {version}")
    configure(db)
    if ident.new:
        _create(db)
    elif version < SCHEMA_VERSION:
        _migrate(db, path, version)


def _create(db: sqlite3.Connection) -> None:
    db.execute("BEGIN")
    try:
        for sql in _SCHEMA.split(";"):
            if sql.strip():
                db.execute(sql)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise


def _migrate(db: sqlite3.Connection, path: Path, version: int) -> None:
    """Apply each step past ``version`` in its own transaction with the version it reaches:
    a crash midway leaves the last version completed, which the next start goes on from."""
    for step in MIGRATIONS:
        if step.to <= version:
            continue
        db.execute("BEGIN")
        try:
            for sql in step.statements:
                db.execute(sql)
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(step.to),))
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        log.info("state_migrated", path=str(path), from_schema=version, to_schema=step.to)
        version = step.to
