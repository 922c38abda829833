"""Reading the ``jobs`` table back: each value checked before use.

What the database holds may be anything (another program, a disk error or an older bug may
have put it there): a value that is not what taskd writes is logged as
``state_value_invalid`` and read as absent, so the job starts as if new in that respect (no
cursor: it starts from now) instead of crashing the start."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from taskd.config.job_table import JOB_NAME
from taskd.run.events import Outcome
from taskd.state.journal import MAX_AHEAD, time_problem

log = structlog.get_logger("taskd.state")

_OUTCOMES = frozenset(o.value for o in Outcome)

# The columns checked_row expects, in order.
JOB_COLUMNS = (
    "name, last_tick, paused, last_run_id, last_outcome, last_started, last_duration, "
    "last_error, last_result, failures, last_success"
)


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


class RowChecker:
    """Turns ``jobs`` rows of one database into JobRows, logging what it refuses."""

    __slots__ = ("now", "path")

    def __init__(self, path: Path, now: float) -> None:
        self.path = path
        self.now = now

    def row(self, row: tuple[Any, ...]) -> JobRow | None:
        """A ``jobs`` row as a JobRow, each value checked; None for a name no job can have."""
        name = row[0]
        if not isinstance(name, str) or not JOB_NAME.fullmatch(name):
            # The config refuses such a name, so no configured job can be meant.
            self._invalid(repr(name)[:100], "name", name, "not a valid job name", "row ignored")
            return None
        last_tick = self._time(name, "last_tick", row[1])
        last_started = self._time(name, "last_started", row[5])
        last_success = self._time(name, "last_success", row[10])
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

    def _time(self, job: str, column: str, value: object) -> float | None:
        if value is None:
            return None
        problem = time_problem(value, self.now)
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
