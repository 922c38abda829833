"""The writes waiting for the next commit, and the SQL that commits them.

The store collects every change of one event-loop iteration here (later changes to the same
job or run replace earlier ones) and writes them in one transaction; see taskd.state.store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Container
from typing import Any

MAX_RESULT_CHARS = 65_536  # a job's last result
# Each history row keeps less: 100,000 rows of 64 KB would be 6.4 GB of disk.
MAX_RUN_RESULT_CHARS = 8_192


def storable(text: str | None) -> str | None:
    """``text`` as SQLite can take it, UTF-8. A lone surrogate (a job's error message may
    hold one: ``json.loads('"\\ud800"')`` of cut UTF-16 text gives it) cannot be encoded,
    and one in a commit failed that commit and every later one: nothing was stored again.
    It is kept as its backslash escape, which inside a JSON string is the same value."""
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def bounded(result_json: str | None, limit: int = MAX_RESULT_CHARS) -> str | None:
    """A stored result of at most ``limit`` characters of JSON; a longer one is kept as a
    JSON string holding its cut text, which says so."""
    if result_json is not None and len(result_json) > limit:
        return json.dumps(result_json[:limit] + "...(truncated)")
    return result_json


class Pending:
    """Changes not yet committed, keyed so that the latest one of each thing wins."""

    __slots__ = ("job_last", "paused", "runs", "shared", "ticks")

    def __init__(self) -> None:
        self.ticks: dict[str, float] = {}
        self.paused: dict[str, bool] = {}
        # run_id -> (run_id, job, scheduled, started, attempts, duration, outcome, error,
        # trigger, result)
        self.runs: dict[str, tuple[Any, ...]] = {}
        # job -> (run_id, outcome, started, duration, error, result, failures, last_success)
        self.job_last: dict[str, tuple[Any, ...]] = {}
        self.shared: dict[str, str | None] = {}  # None: deleted

    def __bool__(self) -> bool:
        return bool(self.ticks or self.paused or self.runs or self.job_last or self.shared)

    def clear(self) -> None:
        self.ticks.clear()
        self.paused.clear()
        self.runs.clear()
        self.job_last.clear()
        self.shared.clear()

    def write(self, db: sqlite3.Connection, open_runs: Container[str] | None = None) -> int:
        """Execute the writes inside the caller's transaction; the history rows added.
        ``open_runs``: the runs committed as running so far, the only ones whose end must
        update a row (a run that started and ended since the last commit is inserted as it
        ended, and an UPDATE of it would cost an index lookup and a page for nothing); None:
        any may."""
        added = 0
        if self.ticks:
            db.executemany(
                "INSERT INTO jobs (name, last_tick) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET last_tick=excluded.last_tick",
                self.ticks.items(),
            )
        if self.paused:
            db.executemany(
                "INSERT INTO jobs (name, paused) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET paused=excluded.paused",
                self.paused.items(),
            )
        if self.runs:
            # Not an upsert: SQLite spends an AUTOINCREMENT number on each, even one that
            # updates, and the count of rows added is what retention needs.
            added = db.executemany(
                "INSERT OR IGNORE INTO runs (run_id, job, scheduled, started, attempts, duration, outcome, error, trigger, result) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                self.runs.values(),
            ).rowcount
            db.executemany(
                "UPDATE runs SET attempts=?, duration=?, outcome=?, error=?, result=? WHERE run_id=?",
                [
                    (r[4], r[5], r[6], r[7], r[9], r[0])
                    for r in self.runs.values()
                    if r[6] != "running" and (open_runs is None or r[0] in open_runs)
                ],
            )
        if self.job_last:
            db.executemany(
                "INSERT INTO jobs (name, last_run_id, last_outcome, last_started, last_duration, last_error, last_result, failures, last_success) "
                "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET last_run_id=excluded.last_run_id, "
                "last_outcome=excluded.last_outcome, last_started=excluded.last_started, "
                "last_duration=excluded.last_duration, last_error=excluded.last_error, "
                "last_result=COALESCE(excluded.last_result, jobs.last_result), failures=excluded.failures, "
                "last_success=COALESCE(excluded.last_success, jobs.last_success)",
                [(job, *row) for job, row in self.job_last.items()],
            )
        if self.shared:
            db.executemany(
                "DELETE FROM shared WHERE key=?",
                [(k,) for k, v in self.shared.items() if v is None],
            )
            db.executemany(
                "INSERT INTO shared (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                [(k, v) for k, v in self.shared.items() if v is not None],
            )
        return added
