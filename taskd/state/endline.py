"""A run's end in the tick journal (``E`` lines): how it ended, on record with the kernel before
the writer's grouped commit has it in the database.

Under load the writer commits about once a second; a ``kill -9`` before that commit would leave
the history row of every run ended since then as the start's ``running`` row, which the next
start marks ``interrupted``, although the run's ``run`` log line says how it ended. So a run's
end is appended to the journal too, in the same per-iteration ``write(2)`` as the ticks (no
extra syscall per run), and replay writes the row the writer would have:

    E <run_id> <job> <scheduled> <started> <attempts> <duration> <outcome> <trigger> <failures> <error> <result>

``error`` and ``result`` are JSON (``null``, or a string: the error's text, the result's JSON
text), which escapes every tab and newline. Both are clipped to CLIP_CHARS, saying so (a cut
result is kept as a JSON string of its cut text, as the history row does past its own limit):
the line stays under the journal's 4 KiB line limit, and replay's memory under MAX_REPLAY_RUNS
such lines, whatever the jobs return. Only a row the kill kept from its commit gets the clipped
text; every other row has the full one from the writer.

Replay is idempotent: a run's row is written only if it is missing or still ``running``, and
a job's last run only if it is missing or older (by start) than the line's."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

from taskd.run.events import Outcome
from taskd.state.writes import bounded

__all__ = ["CLIP_CHARS", "End", "end_line", "parse_end", "replay_ends"]

CLIP_CHARS = 200  # of an error and of a result in an E line: 7 bytes a char at most, < 4 KiB
FIELDS = 12
_ENDED = frozenset(o.value for o in Outcome) - {Outcome.RUNNING.value, Outcome.INTERRUPTED.value}


@dataclass(frozen=True, slots=True)
class End:
    run_id: str
    job: str
    scheduled: float
    started: float
    attempts: int
    duration: float
    outcome: str
    trigger: str
    failures: int
    error: str | None
    result: str | None


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= CLIP_CHARS:
        return text
    return text[:CLIP_CHARS] + "...(truncated)"


def end_line(row: tuple[Any, ...], failures: int) -> str:
    """The line for a run's end: ``row`` is the history row as the writer gets it (run_id,
    job, scheduled, started, attempts, duration, outcome, error, trigger, result; text
    already UTF-8-safe, see writes.storable)."""
    run_id, job, scheduled, started, attempts, duration, outcome, error, trigger, result = row
    # encode_basestring: json.dumps of a str without its dispatch; with None as JSON null, a
    # line costs 1.3 us instead of 3.5 (timeit, a typical succeeded run).
    error, result = _clip(error), bounded(result, CLIP_CHARS)
    err = "null" if error is None else encode_basestring(error)
    res = "null" if result is None else encode_basestring(result)
    return (
        f"E\t{run_id}\t{job}\t{scheduled!r}\t{started!r}\t{attempts}\t{duration!r}\t{outcome}"
        f"\t{trigger}\t{failures}\t{err}\t{res}\n"
    )


def parse_end(parts: list[str]) -> tuple[End | None, str]:
    """An E line's fields after its job, run id, trigger and times were checked by the
    journal (taskd.state.journal): the End, or None and why not."""
    if parts[7] not in _ENDED:
        return None, "not a run outcome"
    try:
        attempts, failures, duration = int(parts[5]), int(parts[9]), float(parts[6])
        error, result = json.loads(parts[10]), json.loads(parts[11])
    except ValueError:
        return None, "attempts, failures, duration, error or result unreadable"
    if not (1 <= attempts <= 1_000_000 and failures >= 0 and 0 <= duration < 1e9):
        # NaN and inf fail the last comparison too.
        return None, "attempts, failures or duration out of range"
    if not (error is None or isinstance(error, str)) or not (
        result is None or isinstance(result, str)
    ):
        return None, "error or result not text"
    return End(
        parts[1],
        parts[2],
        float(parts[3]),
        float(parts[4]),
        attempts,
        duration,
        parts[7],
        parts[8],
        failures,
        error,
        result,
    ), ""


def replay_ends(db: sqlite3.Connection, ends: list[End]) -> None:
    """Inside the caller's transaction, after the run starts were inserted as ``running``."""
    db.executemany(
        "INSERT OR IGNORE INTO runs (run_id, job, scheduled, started, attempts, duration, "
        "outcome, error, trigger, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                e.run_id,
                e.job,
                e.scheduled,
                e.started,
                e.attempts,
                e.duration,
                e.outcome,
                e.error,
                e.trigger,
                e.result,
            )
            for e in ends
        ],
    )
    # Only a row still "running": one the writer committed as it ended keeps its full text.
    db.executemany(
        "UPDATE runs SET attempts=?, duration=?, outcome=?, error=?, result=? "
        "WHERE run_id=? AND outcome='running'",
        [(e.attempts, e.duration, e.outcome, e.error, e.result, e.run_id) for e in ends],
    )
    last: dict[str, End] = {}
    for e in ends:
        if e.job not in last or e.started >= last[e.job].started:
            last[e.job] = e
    # The job's last run, unless one as new or newer is there already (committed, or this
    # same run: its stored result is the full one).
    db.executemany(
        "INSERT INTO jobs (name, last_run_id, last_outcome, last_started, last_duration, "
        "last_error, last_result, failures, last_success) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET last_run_id=excluded.last_run_id, "
        "last_outcome=excluded.last_outcome, last_started=excluded.last_started, "
        "last_duration=excluded.last_duration, last_error=excluded.last_error, "
        "last_result=COALESCE(excluded.last_result, jobs.last_result), "
        "failures=excluded.failures, "
        "last_success=COALESCE(excluded.last_success, jobs.last_success) "
        "WHERE jobs.last_started IS NULL OR typeof(jobs.last_started) NOT IN ('real', 'integer') "
        "OR jobs.last_started < excluded.last_started",
        [
            (
                e.job,
                e.run_id,
                e.outcome,
                e.started,
                e.duration,
                e.error,
                e.result,
                e.failures,
                e.started + e.duration if e.outcome == "succeeded" else None,
            )
            for e in last.values()
        ],
    )
