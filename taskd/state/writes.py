"""The writes waiting for the next commit, and the SQL that commits them.

The store collects every change of one event-loop iteration here (later changes to the same
job or run replace earlier ones) and writes them in one transaction; see taskd.state.store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Container
from itertools import chain
from typing import Any

MAX_RESULT_CHARS = 65_536  # a job's last result
# Each history row keeps less: 100,000 rows of 64 KB would be 6.4 GB of disk.
MAX_RUN_RESULT_CHARS = 8_192
# Rows per multi-row statement: at most 10 parameters each, well under SQLite's 32,766.
CHUNK_ROWS = 1000


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
            _values(
                db,
                "INSERT INTO jobs (name, last_tick) VALUES ",
                list(self.ticks.items()),
                " ON CONFLICT(name) DO UPDATE SET last_tick=excluded.last_tick",
            )
        if self.paused:
            _values(
                db,
                "INSERT INTO jobs (name, paused) VALUES ",
                list(self.paused.items()),
                " ON CONFLICT(name) DO UPDATE SET paused=excluded.paused",
            )
        if self.runs:
            # Not an upsert: SQLite spends an AUTOINCREMENT number on each, even one that
            # updates, and the count of rows added is what retention needs.
            added = _values(
                db,
                "INSERT OR IGNORE INTO runs (run_id, job, scheduled, started, attempts, "
                "duration, outcome, error, trigger, result) VALUES ",
                list(self.runs.values()),
            )
            _values(
                db,
                "UPDATE runs SET attempts=v.column1, duration=v.column2, outcome=v.column3, "
                "error=v.column4, result=v.column5 FROM (VALUES ",
                [
                    (r[4], r[5], r[6], r[7], r[9], r[0])
                    for r in self.runs.values()
                    if r[6] != "running" and (open_runs is None or r[0] in open_runs)
                ],
                ") AS v WHERE runs.run_id = v.column6",
            )
        if self.job_last:
            _values(
                db,
                "INSERT INTO jobs (name, last_run_id, last_outcome, last_started, last_duration, "
                "last_error, last_result, failures, last_success) VALUES ",
                [(job, *row) for job, row in self.job_last.items()],
                " ON CONFLICT(name) DO UPDATE SET last_run_id=excluded.last_run_id, "
                "last_outcome=excluded.last_outcome, last_started=excluded.last_started, "
                "last_duration=excluded.last_duration, last_error=excluded.last_error, "
                "last_result=COALESCE(excluded.last_result, jobs.last_result), "
                "failures=excluded.failures, "
                "last_success=COALESCE(excluded.last_success, jobs.last_success)",
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


def _values(db: sqlite3.Connection, head: str, rows: list[tuple[Any, ...]], tail: str = "") -> int:
    """``head`` + ``(?,..),(?,..),...`` + ``tail`` for ``rows``, CHUNK_ROWS at a time; the
    rows changed. One statement per chunk rather than executemany's one per row: the state
    writer's thread gives the GIL back to the loop for each statement's whole work, instead of
    taking it again after every row (a 10,000-run burst's commit took the GIL back 30,000
    times, and the loop, busy with the next burst, waited for it in 5 ms turns)."""
    if not rows:
        return 0
    one = "(" + ",".join("?" * len(rows[0])) + ")"
    changed = 0
    for i in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[i : i + CHUNK_ROWS]
        sql = head + ",".join([one] * len(chunk)) + tail
        changed += db.execute(sql, list(chain.from_iterable(chunk))).rowcount
    return changed
