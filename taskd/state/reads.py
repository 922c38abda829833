"""The daemon's own reads of the state database, run on the state writer's thread (which owns
the connection) after every write queued before them (taskd.state.store)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

from taskd.errors import StateError
from taskd.state.rows import JOB_COLUMNS, JobRow, RowChecker

if TYPE_CHECKING:
    from collections.abc import Callable

    from taskd.state.writer import Writer


class Call:
    """A function run on the writer thread after everything queued before it is committed
    (or, while commits fail, folded into what is kept in memory)."""

    __slots__ = ("done", "error", "fn", "result", "strict")

    def __init__(self, fn: Callable[[Writer], Any], strict: bool) -> None:
        self.fn = fn
        self.strict = strict  # raise the commit's error instead of running fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def closed() -> StateError:
    return StateError("state store is not open")


def read_jobs(w: Writer) -> dict[str, JobRow]:
    out: dict[str, JobRow] = {}
    checker = RowChecker(w.path, time.time())
    for row in w.db.execute(f"SELECT {JOB_COLUMNS} FROM jobs"):
        checked = checker.row(row)
        if checked is not None:
            out[checked.name] = checked
    # What commits that failed left in memory.
    pending = w.pending
    for name, tick in pending.ticks.items():
        out.setdefault(name, JobRow(name)).last_tick = tick
    for name, paused in pending.paused.items():
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
    ) in pending.job_last.items():
        r = out.setdefault(name, JobRow(name))
        r.last_run_id, r.last_outcome, r.last_started = run_id, outcome, started
        r.last_duration, r.last_error, r.failures = duration, error, failures
        r.last_success = success if success is not None else r.last_success
    return out


def read_shared(w: Writer) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in w.db.execute("SELECT key, value FROM shared")}


_HISTORY_COLUMNS = (
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


def read_history(db: sqlite3.Connection, job: str | None, limit: int) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(_HISTORY_COLUMNS)} FROM runs"
    args: tuple[Any, ...] = ()
    if job is not None:
        sql += " WHERE job = ?"
        args = (job,)
    sql += " ORDER BY seq DESC LIMIT ?"
    return [dict(zip(_HISTORY_COLUMNS, r, strict=True)) for r in db.execute(sql, (*args, limit))]
