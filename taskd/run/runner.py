"""One run of a job: its attempts, timeout, retries with backoff, events, history record and the
one canonical log line. Anything the job raises or returns is this run's outcome, never the
daemon's problem."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from taskd.errors import JobTimeout, ResultTooLarge
from taskd.run.context import JobContext
from taskd.run.events import Cause, EventKind, JobEvent, Outcome
from taskd.run.executors import with_timeout
from taskd.run.limits import cut
from taskd.run.sinks import RunEnd, encode_result

if TYPE_CHECKING:
    from taskd.jobspec import JobSpec
    from taskd.run.runtime import Runtime

MAX_BACKOFF = 3600.0

SUCCEEDED = Outcome.SUCCEEDED
FAILED = Outcome.FAILED
TIMED_OUT = Outcome.TIMED_OUT
CANCELLED = Outcome.CANCELLED


@dataclass(slots=True)
class RunInfo:
    """A run in flight, as status reads it."""

    run_id: str
    job: str
    scheduled: float
    started: float
    cause: Cause
    attempt: int = 1
    outcome: Outcome | None = None
    error: str | None = None
    result: Any = None
    # The result in the form the sinks keep it (see sinks.encode_result), made once.
    encoded: tuple[Any, str | None, bool] | None = None
    cancel_reason: str | None = field(default=None)
    ended: float = 0.0
    in_backoff: bool = False  # waiting to retry: a stop need not wait for it


def _error_text(exc: BaseException) -> str:
    """``Type: message``, cut to MAX_ERROR_TEXT: it goes into the run line, the history row
    and the event hooks, where a 5 MB exception message would cost 5 MB each run."""
    try:
        text = str(exc)
    except Exception:
        text = "<str() of the exception failed>"
    return cut(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _checked(rt: Runtime, info: RunInfo, result: Any) -> Any:
    """``result`` once its stored form fits ``max_result_size``; raise if it does not."""
    info.encoded = encoded = encode_result(result)
    text = encoded[1]
    limit = rt.max_result_size
    if text is not None and len(text) > limit:
        info.encoded = None
        raise ResultTooLarge(
            f"the result ({type(result).__qualname__}) is {len(text)} characters as JSON, "
            f"over max_result_size={limit} bytes ({limit / (1 << 20):.1f} MiB); return less "
            f"(write big output to a file and return its path) or raise [daemon] "
            f"max_result_size"
        )
    return result


async def _attempt(rt: Runtime, spec: JobSpec, info: RunInfo) -> Any:
    jt = spec.jobtype
    assert jt is not None
    cfg = spec.config
    label = f"job {cfg.name!r} run {info.run_id}"
    if jt.kind == "io":
        ctx = JobContext(
            job=cfg.name,
            run_id=info.run_id,
            attempt=info.attempt,
            scheduled=info.scheduled,
            state=rt.shared,
            offload=rt,
            base_log=rt.log,
            resources=rt.resources,
        )
        try:
            return await with_timeout(jt.func(ctx, **spec.kwargs), cfg.timeout, label)
        finally:
            ctx.release_resources()
    if jt.kind == "blocking":
        return await rt.threads.run(jt.func, spec.kwargs, cfg.timeout, label)
    pool = await rt.procs()
    return await pool.run(
        jt.func,
        (),
        spec.kwargs,
        timeout=cfg.timeout,
        max_memory=cfg.max_memory,
        max_result=rt.max_result_size,
        label=label,
    )


async def execute(rt: Runtime, spec: JobSpec, info: RunInfo) -> RunInfo:
    """Run ``spec`` once for the tick in ``info``, with retries. Returns ``info`` with its
    outcome. Re-raises CancelledError after recording the run as cancelled."""
    cfg = spec.config
    store = rt.store
    if store is not None:
        # On record (the journal) before the job does anything: a restart after a crash
        # neither runs this tick again nor forgets that the run existed.
        store.run_started(info.run_id, cfg.name, info.scheduled, info.started, info.cause)
    rt.stats.running += 1
    try:
        while True:
            if rt.listeners:
                rt.emit(
                    JobEvent(
                        EventKind.STARTED,
                        cfg.name,
                        info.run_id,
                        _utc(info.scheduled),
                        info.attempt,
                        time.time(),
                    )
                )
            try:
                info.result = _checked(rt, info, await _attempt(rt, spec, info))
                info.outcome = SUCCEEDED
                info.error = None
                break
            except asyncio.CancelledError as exc:
                me = asyncio.current_task()
                if me is not None and me.cancelling() == 0:
                    # Nobody cancelled us: the job raised CancelledError itself (a library
                    # leaking one). That is the job's failure, not a reason to stop.
                    info.outcome, info.error = FAILED, _error_text(exc) + " (raised by the job)"
                else:
                    info.outcome = CANCELLED
                    info.error = info.cancel_reason or "cancelled"
                    raise
            except JobTimeout as exc:
                info.outcome, info.error = TIMED_OUT, cut(str(exc))
            except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the run's failure
                info.outcome, info.error = FAILED, _error_text(exc)
                if not isinstance(exc, Exception):
                    rt.log.warning(
                        "job_raised_base_exception",
                        job=cfg.name,
                        run_id=info.run_id,
                        error=info.error,
                    )
            if info.attempt > cfg.retries:
                break
            if rt.stopping:
                # A retry would wait for a backoff the stop has no time for: the run ends as
                # it stands (failed or timed out), not held until the drain deadline.
                break
            rt.stats.retries[cfg.name] += 1
            delay = min(cfg.retry_backoff * (2 ** (info.attempt - 1)), MAX_BACKOFF)
            rt.log.warning(
                "run_retrying",
                job=cfg.name,
                run_id=info.run_id,
                attempt=info.attempt,
                outcome=info.outcome,
                error=info.error,
                retry_in=round(delay, 3),
            )
            rt.emit(
                JobEvent(
                    EventKind.RETRYING,
                    cfg.name,
                    info.run_id,
                    _utc(info.scheduled),
                    info.attempt,
                    time.time(),
                    reason=info.outcome,
                    error=info.error,
                )
            )
            info.in_backoff = True
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                info.outcome = CANCELLED
                info.error = info.cancel_reason or "cancelled"
                raise
            finally:
                info.in_backoff = False
            info.attempt += 1
    finally:
        rt.stats.running -= 1
        info.ended = time.time()
        # The log line, history row and events are written one loop iteration later: when
        # many runs start at once, every one of them starts before any end is written.
        rt.defer(_finish, rt, spec, info)
    return info


def cancelled_before_start(rt: Runtime, spec: JobSpec, info: RunInfo) -> None:
    """Record a run whose task was cancelled before it took its first step (so ``execute``
    never ran): it ends as cancelled, with a log line and a history row like any other."""
    info.outcome = CANCELLED
    info.error = info.cancel_reason or "cancelled"
    info.ended = time.time()
    rt.defer(_finish, rt, spec, info)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _finish(rt: Runtime, spec: JobSpec, info: RunInfo) -> None:
    """Hand the ended run to every sink (taskd.run.sinks), each on its own: one that raises
    is logged and the rest still run."""
    end = RunEnd.of(spec, info)
    for sink in rt.sinks:
        try:
            sink.run_ended(end)
        except Exception:  # bookkeeping must never lose the other sinks' work
            rt.log.exception("sink_failed", sink=type(sink).__name__, job=spec.config.name)
