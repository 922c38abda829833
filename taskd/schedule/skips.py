"""Skip reporting: every skipped tick is an event at once; the log line is per span.

Once the daemon falls a tick behind, every job skips a tick on each wake-up. One warning per
job per tick was 28% of the daemon's profile in a 10,000-jobs-per-second burst, and the cost
fed the backlog that caused it. So the *log* is per span: the first skip of a job logs at
once (so an operator sees it start), and further skips of the same job for the same reason
are added up and logged as one ``skipped`` line with ``count``/``first``/``last`` when the
span ends: the job handles a tick without skipping (it is back on time), the reason changes,
a reload changes or removes the job, it is paused, the daemon stops, or 60 s have passed
since the first one added up (so nothing waits in memory for long). The *event* (metrics,
``taskd status``, plugins' ``taskd_job_event``) is still emitted for every skip when it
happens, so the counters are exact whenever they are read."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from taskd.run.events import EventKind, JobEvent, SkipReason

if TYPE_CHECKING:
    from taskd.run.runtime import Runtime

log = structlog.get_logger("taskd.schedule")

# The longest a skip waits in a span before it is logged.
REPORT_EVERY = 60.0


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def log_skip(job: str, reason: SkipReason, first: float, last: float, count: int) -> None:
    """One ``skipped`` line for ``count`` ticks from ``first`` to ``last``."""
    fields = {"job": job, "reason": str(reason), "count": count, "first": _utc(first).isoformat()}
    if count > 1:
        fields["last"] = _utc(last).isoformat()
    if reason is SkipReason.PAUSED:
        log.debug("skipped", **fields)
    else:
        log.warning("skipped", **fields)


class SkipSpan:
    """The skips of one job for one reason since its last ``skipped`` line: a job that has
    one keeps skipping (or has just skipped), and what it adds up is logged later."""

    __slots__ = ("count", "first", "job", "last", "reason", "timer")

    def __init__(self, job: str, reason: SkipReason) -> None:
        self.job = job
        self.reason = reason
        self.count = 0  # skipped ticks not yet logged
        self.first = 0.0
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, first: float, last: float, count: int) -> None:
        if not self.count:
            self.first = first
            # Bound how long a skip waits unlogged, even if the job never wakes again.
            self.timer = asyncio.get_running_loop().call_later(REPORT_EVERY, self.report)
        self.count += count
        self.last = last

    def report(self) -> None:
        """Log what was added up (if anything); the span goes on."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.count:
            log_skip(self.job, self.reason, self.first, self.last, self.count)
            self.count = 0


def skip(
    rt: Runtime,
    job: str,
    span: SkipSpan | None,
    reason: SkipReason,
    first: float,
    last: float,
    count: int,
) -> SkipSpan:
    """Count ``count`` skipped ticks from ``first`` to ``last`` now (one event), and log them
    now or as part of the job's span. Returns the job's span from here on."""
    rt.emit(
        JobEvent(
            EventKind.SKIPPED,
            job,
            "",
            _utc(first),
            0,
            time.time(),
            reason=str(reason),
            count=count,
        )
    )
    if span is not None and span.reason is reason:
        span.add(first, last, count)
        return span
    if span is not None:
        span.report()  # the reason changed: that span is over
    log_skip(job, reason, first, last, count)
    return SkipSpan(job, reason)
