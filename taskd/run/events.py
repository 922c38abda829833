"""JobEvent: what happened to a run, handed to the ``taskd_job_event`` hook and the log."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class EventKind(enum.StrEnum):
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class Cause(enum.StrEnum):
    """Why a run exists. Stored as the history row's ``trigger`` column."""

    SCHEDULE = "schedule"  # its tick came
    CATCHUP = "catchup"  # a tick older than ``grace``, run because of ``catchup``
    MANUAL = "manual"  # ``taskd trigger``
    EXEC = "exec"  # ``taskd exec``, outside the daemon
    TAKEOVER = "takeover"  # a fleet job's tick whose owner lost its lease, run here instead


class Outcome(enum.StrEnum):
    """How a run ended (or that it has not: RUNNING, INTERRUPTED in the history)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    RUNNING = "running"  # in the history only: started, not ended yet
    INTERRUPTED = "interrupted"  # in the history only: the daemon died during the run

    @property
    def failed(self) -> bool:
        """An outcome that counts as a failure (for consecutive failures and --failed)."""
        return self in (Outcome.FAILED, Outcome.TIMED_OUT, Outcome.INTERRUPTED)


class SkipReason(enum.StrEnum):
    """Why a tick did not become a run. Every skip carries one and is counted."""

    OVERLAP = "overlap"  # overlap = "skip" and the previous run is still going
    MISSED = "missed"  # later than ``grace`` (daemon down, loop blocked, host asleep)
    COALESCED = "coalesced"  # catchup = "latest" folded this tick into a later one
    PAUSED = "paused"
    BROKEN = "broken"  # the job's plugin failed to load
    SHUTDOWN = "shutdown"  # queued behind a running run when the daemon stopped
    REMOVED = "removed"  # queued behind a running run when a reload removed the job
    QUEUE_FULL = "queue_full"  # overlap = "queue" and too many ticks already wait
    REPLACED = "replaced"  # queued behind a run that overlap = "replace" cancelled
    CRASHED = "crashed"  # the job's scheduling task ended by a bug (logged); restart taskd
    EXHAUSTED = "exhausted"  # a blocking run, and every thread thread_workers_max allows is stuck
    # scope = "fleet" (the run is claimed from the fleet's database first):
    ELSEWHERE = "elsewhere"  # another host claimed this tick and runs it (logged at debug)
    FLEET_UNAVAILABLE = "fleet_unavailable"  # the fleet database is down or unreachable
    CLOCK_SKEW = "clock_skew"  # the tick came early twice by the database's clock


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One event in a run's life. ``scheduled`` is the tick (aware UTC) the run belongs to."""

    kind: EventKind
    job: str
    run_id: str
    scheduled: datetime
    attempt: int = 0
    at: float = 0.0  # wall-clock time of the event (epoch seconds)
    reason: str | None = None  # for skipped, cancelled, retrying: why
    error: str | None = None  # for failed, timed_out, retrying: the error, one line
    duration: float | None = None  # seconds, for the end events
    result: Any = None  # for succeeded: what the job returned
    count: int = 1  # for skipped: how many ticks this one event stands for
