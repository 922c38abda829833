"""The state database's tables, their version, and the ordered steps that bring an older
file up to date. A new column or table is one more entry in MIGRATIONS and one more in
SCHEMA_VERSION; nothing else changes."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import structlog

from taskd.errors import StateError

log = structlog.get_logger("taskd.state")

SCHEMA_VERSION = 2

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
CREATE TABLE IF NOT EXISTS shared (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One step: takes a database of schema ``to - 1`` to schema ``to``."""

    to: int
    statements: tuple[str, ...]


# In order; each applied in its own transaction together with the version it reaches.
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
)


def prepare(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables in a new file, or bring an older one up to SCHEMA_VERSION."""
    has_tables = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
    ).fetchone()
    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if has_tables else None
    if row is None:
        db.executescript(_SCHEMA)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) > SCHEMA_VERSION:
        raise StateError(
            f"state database {path} has schema {row[0]}, newer than this taskd ({SCHEMA_VERSION}); "
            "upgrade taskd or use another state_dir"
        )
    elif int(row[0]) < SCHEMA_VERSION:
        _migrate(db, path, int(row[0]))


def _migrate(db: sqlite3.Connection, path: Path, version: int) -> None:
    """Bring an older database up to SCHEMA_VERSION in one transaction: a crash midway
    leaves the old version, which the next start migrates again."""
    db.execute("BEGIN")
    try:
        for step in MIGRATIONS:
            if step.to > version:
                for sql in step.statements:
                    db.execute(sql)
        db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    log.info("state_migrated", path=str(path), from_schema=version, to_schema=SCHEMA_VERSION)
