"""Skip reporting: every skipped tick is an event at once; the log line is rate-limited.

Once the daemon falls a tick behind, every job skips a tick on many wake-ups. One warning per
job per tick was 28% of the daemon's profile in a 10,000-jobs-per-second burst, and the cost
fed the backlog that caused it. So the *log* says it at most once a minute per job and
reason: the first skip is logged at once (an operator sees it start), and the ones after it
within REPORT_EVERY of that line are added up and logged as one ``skipped`` line with
``count``/``first``/``last`` when the minute is up, or sooner when the reason changes, a
reload changes or removes the job, it is paused, or the daemon stops (so nothing is left
unlogged). A job in a burst is often on time for a tick between two skips, so "back on
time" does not end the span: that would be a line per tick again. The *event* (metrics,
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
    if reason is SkipReason.PAUSED or reason is SkipReason.ELSEWHERE:
        # Expected, not a problem: a paused job, a tick another host of the fleet runs.
        log.debug("skipped", **fields)
    else:
        log.warning("skipped", **fields)


class SkipSpan:
    """The skips of one job for one reason since its last ``skipped`` line."""

    __slots__ = ("count", "first", "job", "last", "logged", "reason", "timer")

    def __init__(self, job: str, reason: SkipReason) -> None:
        self.job = job
        self.reason = reason
        self.count = 0  # skipped ticks not yet logged
        self.first = 0.0
        self.last = 0.0
        self.logged = asyncio.get_running_loop().time()  # when its last line was written
        self.timer: asyncio.TimerHandle | None = None

    def idle(self) -> bool:
        """Nothing waits to be logged and the last line is older than REPORT_EVERY: the
        next skip is logged at once."""
        return not self.count and asyncio.get_running_loop().time() - self.logged >= REPORT_EVERY

    def add(self, first: float, last: float, count: int) -> None:
        if not self.count:
            self.first = first
            loop = asyncio.get_running_loop()
            self.timer = loop.call_at(self.logged + REPORT_EVERY, self.report)
        self.count += count
        self.last = last

    def report(self) -> None:
        """Log what was added up (if anything)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.count:
            log_skip(self.job, self.reason, self.first, self.last, self.count)
            self.count = 0
            self.logged = asyncio.get_running_loop().time()


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
    now or with the job's span. Returns the job's span from here on."""
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
    if span is not None and span.reason is reason and not span.idle():
        span.add(first, last, count)
        return span
    if span is not None:
        span.report()  # the reason changed: that span is over
    log_skip(job, reason, first, last, count)
    return SkipSpan(job, reason)
