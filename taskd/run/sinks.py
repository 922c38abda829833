"""Where a run's end goes: one list of sinks, called in order, once per run.

The runner builds one :class:`RunEnd` (the result serialised once) and hands it to each sink:
stats (counters and the job's failure streak, which the ledger then records), the ledger
(history row and the job's last run), shared state (the result under the job's name), the
log (the one canonical ``run`` line) and the plugins' event hook. A new consumer (metrics)
is one more sink; the runner does not change. This is the hot path: a sink does O(1) work
on the loop thread and never awaits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from taskd.log import Emit, RunLine, direct_json, direct_run_line
from taskd.run.encoding import NO_RESULT
from taskd.run.events import Cause, EventKind, JobEvent, Outcome

if TYPE_CHECKING:
    from taskd.jobspec import JobSpec
    from taskd.ledger import Ledger
    from taskd.run.runner import RunInfo
    from taskd.run.runtime import Runtime

MAX_LOGGED_RESULT = 300  # characters of JSON; larger results are only stored

SUCCEEDED = Outcome.SUCCEEDED
CANCELLED = Outcome.CANCELLED
SCHEDULE = Cause.SCHEDULE

_EVENT_OF = {
    Outcome.SUCCEEDED: EventKind.SUCCEEDED,
    Outcome.FAILED: EventKind.FAILED,
    Outcome.TIMED_OUT: EventKind.TIMED_OUT,
}


@dataclass(slots=True)
class RunEnd:
    """One ended run, as every sink sees it."""

    spec: JobSpec
    info: RunInfo
    outcome: Outcome
    duration: float
    result: Any  # what the job returned (None unless it succeeded)
    stored: Any  # its JSON-able form: the result itself, or its repr
    result_json: str | None  # ``stored`` as JSON text, None for no result
    serialisable: bool  # the result itself was JSON (not a repr)
    ledger: Ledger  # where the run went on record when it started (its job's)
    failures: int = 0  # the job's consecutive failures, this run included (StatsSink sets it)

    @classmethod
    def of(cls, spec: JobSpec, info: RunInfo, ledger: Ledger) -> RunEnd:
        outcome = info.outcome or Outcome.CANCELLED
        result = info.result if outcome is Outcome.SUCCEEDED else None
        # The runner encoded (and measured) every result it accepted: see limits.encode.
        encoded = info.encoded if result is not None and info.encoded is not None else NO_RESULT
        stored, result_json, serialisable, _ = encoded
        return cls(
            spec,
            info,
            outcome,
            info.ended - info.started,
            result,
            stored,
            result_json,
            serialisable,
            ledger,
        )


class RunSink(Protocol):
    def run_ended(self, end: RunEnd) -> None:
        """Take note of one ended run. Must not block or await; an exception is logged and
        the other sinks still run."""


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class StatsSink:
    """Counters and each job's latest run and failure streak (status, metrics)."""

    __slots__ = ("rt",)

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def run_ended(self, end: RunEnd) -> None:
        info = end.info
        end.failures = self.rt.stats.record(
            end.spec.config.name, info.run_id, end.outcome, info.started, end.duration, info.error
        )


class LedgerSink:
    """The run's end on record with the ledger its start went to (taskd.ledger): for a
    LocalLedger, the history row and the job's last run, batched into the next commit."""

    __slots__ = ()

    def run_ended(self, end: RunEnd) -> None:
        end.ledger.finish(end)


class SharedStateSink:
    """A run's return value goes into shared state under the job's name, on the loop thread
    (thread and process jobs never touch shared state themselves)."""

    __slots__ = ("rt",)

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def run_ended(self, end: RunEnd) -> None:
        if end.result_json is None:
            return
        job, value, shared = end.spec.config.name, end.stored, self.rt.shared
        # The ticket is taken now, at the run's end: the order runs ended in decides, not
        # the order their writes get the lock in.
        ticket = shared.result_ticket(job)
        if shared.lock.locked():
            # An io job holds the lock across an await: record once it lets go, still on the
            # loop. A newer run may end (and be recorded) meanwhile; then this one is dropped.
            async def later() -> None:
                async with shared.lock:
                    shared.set_result(job, value, ticket)

            self.rt.spawn(later())
        else:
            shared.set_result(job, value, ticket)


class LogSink:
    """The one canonical ``run`` line per run."""

    __slots__ = ("_emit", "_log", "_run_line", "rt")

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._log: Any = None
        self._emit: Emit | None = None
        self._run_line: RunLine | None = None

    def run_ended(self, end: RunEnd) -> None:
        info = end.info
        outcome = end.outcome
        log = self.rt.log  # read per run: a reload may have reconfigured logging
        if log is not self._log:
            self._log, self._emit, self._run_line = log, direct_json(log), direct_run_line(log)
        if (
            outcome is SUCCEEDED
            and self._run_line is not None
            and info.cause is SCHEDULE
            and end.result_json is None
            and end.spec.fast  # a name the config checked, a run id of the daemon's
        ):
            # The commonest line, formatted directly (taskd.log.direct_run_line).
            self._run_line(
                end.spec.config.name,
                info.run_id,
                info.attempt,
                round(end.duration, 6),
                round(info.started - info.scheduled, 6),
            )
            return
        method = "info" if outcome is SUCCEEDED else "warning" if outcome is CANCELLED else "error"
        # The line's fields in their order: the ones every line has, then the few optional.
        fields = {
            "job": end.spec.config.name,
            "run_id": info.run_id,
            "attempt": info.attempt,
            "outcome": str(outcome),
            "duration": round(end.duration, 6),
            "late": round(info.started - info.scheduled, 6),
        }
        if info.cause is not SCHEDULE:
            fields["cause"] = str(info.cause)
        if info.error:
            fields["error"] = info.error
        text = end.result_json
        if end.serialisable and text is not None and len(text) <= MAX_LOGGED_RESULT:
            # Small enough for the line; the store has them all.
            fields["result"] = end.result
        emit = self._emit
        if emit is not None:  # JSON lines: straight to the renderer (taskd.log.direct_json)
            emit(method, "run", fields)
        else:
            getattr(log, method)("run", **fields)


class HookSink:
    """The plugins' ``taskd_job_event`` hook: the run's end event."""

    __slots__ = ("rt",)

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def run_ended(self, end: RunEnd) -> None:
        rt = self.rt
        if not rt.listeners:
            return
        info = end.info
        kind = _EVENT_OF.get(end.outcome, EventKind.CANCELLED)
        rt.emit(
            JobEvent(
                kind,
                end.spec.config.name,
                info.run_id,
                _utc(info.scheduled),
                info.attempt,
                info.ended,
                reason=info.cancel_reason if kind is EventKind.CANCELLED else None,
                error=info.error,
                duration=end.duration,
                result=end.result,
            )
        )


def default_sinks(rt: Runtime) -> list[RunSink]:
    """The sinks every daemon has, in order: stats first (the ledger records the streak it
    computes), the log line before the hooks (a slow notifier never delays the line)."""
    return [StatsSink(rt), LedgerSink(), SharedStateSink(rt), LogSink(rt), HookSink(rt)]
