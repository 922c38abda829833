"""One run of a job: its attempts, timeout, retries with backoff, events, history record and the
one canonical log line. Anything the job raises or returns is this run's outcome, never the
daemon's problem."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from taskd.errors import JobTimeout
from taskd.ledger._base import CLAIMING, HOST_CLAIM, Claim
from taskd.run.context import JobContext
from taskd.run.encoding import NO_RESULT, Encoded, TooLarge, encode
from taskd.run.events import Cause, EventKind, JobEvent, Outcome
from taskd.run.executor._base import Call
from taskd.run.executor.thread import blocking, too_large_error
from taskd.run.executors import with_timeout
from taskd.run.limits import MAX_ERROR_TEXT, cut, describe, recall
from taskd.run.sinks import RunEnd

if TYPE_CHECKING:
    from collections.abc import Callable

    from taskd.jobspec import JobSpec
    from taskd.ledger import Ledger
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
    # The result in the form the sinks keep it (see limits.encode), made once, and measured
    # against max_result_size where the run ran (a cpu job's worker, a blocking job's thread).
    encoded: Encoded | None = None
    cancel_reason: str | None = field(default=None)
    ended: float = 0.0
    in_backoff: bool = False  # waiting to retry: a stop need not wait for it
    # The run's right to its tick, as its ledger granted it: the shared HOST_CLAIM for a host
    # run (nothing allocated), CLAIMING while a fleet ledger is asked, then the fleet's claim
    # with its fence (ctx.fence).
    claim: Claim = HOST_CLAIM


def _error_text(exc: BaseException, label: str = "") -> str:
    """``Type: message``, cut to MAX_ERROR_TEXT: it goes into the run line, the history row
    and the event hooks, where a 5 MB exception message would cost 5 MB each run.

    Never an unbounded ``str()`` on the loop: a cpu job's exception comes with the text its
    worker made, a blocking job's with the text its thread made; others are described within
    bounds here (limits.describe). ``label`` ("job 'j' run r"), which the process pool puts
    in front of its own messages, is dropped: the run line and row say which run it was."""
    text = recall(exc) or describe(exc)
    if label:
        name = type(exc).__qualname__
        text = text.replace(f"{name}: {label}: ", f"{name}: ", 1)
    # Both texts are cut already (with the marker saying how much): cut only a text that
    # came some other way, never again with a marker that undercounts.
    return cut(text, MAX_ERROR_TEXT + 64)


def _checked(rt: Runtime, info: RunInfo, result: Any) -> Any:
    """``result`` once its stored form fits ``max_result_size``; raise if it does not. A cpu
    or blocking run's result was measured where it ran; an io run's is measured here, within
    bounds (limits.encode)."""
    if info.encoded is None:
        if result is None:  # the commonest result, told without a call
            info.encoded = NO_RESULT
            return result
        limit = rt.max_result_size
        try:
            info.encoded = encode(result, limit)
        except TooLarge as over:
            raise too_large_error(result, over, limit) from None
    return result


async def _attempt(rt: Runtime, spec: JobSpec, info: RunInfo) -> Any:
    jt = spec.jobtype
    assert jt is not None
    cfg = spec.config
    info.encoded = None
    kind = jt.kind
    if kind == "io":
        ctx = JobContext.for_run(
            cfg.name, info.run_id, info.attempt, info.scheduled, rt, info.claim.fence
        )
        try:
            if cfg.timeout is None:
                # No with_timeout frame around the job when it has no timeout (the default).
                return await jt.func(ctx, **spec.kwargs)
            return await with_timeout(jt.func(ctx, **spec.kwargs), cfg.timeout, _label(spec, info))
        finally:
            if ctx._scope is not None:
                ctx.release_resources()
    if spec.executor is not None:  # a job that named an executor not its kind's default
        return await _elsewhere(rt, spec, info)
    if kind == "blocking":
        call = functools.partial(blocking, jt.func, spec.kwargs, rt.max_result_size)
        result, info.encoded = await rt.threads.run(call, {}, cfg.timeout, _label(spec, info))
        return result
    pool = rt.process.pool or await rt.process.started()  # no coroutine per run once it is up
    result, info.encoded = await pool.run_measured(
        jt.func,
        (),
        spec.kwargs,
        timeout=cfg.timeout,
        max_memory=cfg.max_memory,
        max_result=rt.max_result_size,
        label=_label(spec, info),
    )
    return result


async def _elsewhere(rt: Runtime, spec: JobSpec, info: RunInfo) -> Any:
    """An attempt through the job's executor (a plugin's, or the bundled dask one): started
    on its first run, a failure to start failing this run (the next one tries again)."""
    name = spec.executor
    assert name is not None and spec.jobtype is not None
    cfg = spec.config
    label = _label(spec, info)
    call = Call(
        spec.jobtype.func,
        spec.kwargs,
        cfg.timeout,
        cfg.max_memory,
        rt.max_result_size,
        label,
        f"{info.run_id}-{info.attempt}",
    )
    if cfg.timeout is None or name in rt.executors.live:
        result, info.encoded = await rt.executors.run(name, call)
    else:
        # Not started yet (the first run, or the last start failed): the start counts
        # against the run's timeout, so a cluster that never answers cannot hold the run
        # past it.
        result, info.encoded = await with_timeout(rt.executors.run(name, call), cfg.timeout, label)
    return result


async def execute(
    rt: Runtime,
    spec: JobSpec,
    info: RunInfo,
    ledger: Ledger,
    claimed: Callable[[RunInfo], None] | None = None,
) -> RunInfo:
    """Run ``spec`` once for the tick in ``info``, with retries, on record with ``ledger``
    (the job's). Returns ``info`` with its outcome. Re-raises CancelledError after recording
    the run as cancelled. Raises :class:`~taskd.ledger.NotClaimed` when the ledger refused
    the run: then nothing was recorded or counted (the caller skips its tick). ``claimed``
    is called once a ledger that asks first has granted the run."""
    cfg = spec.config
    # On record before the job does anything: a restart after a crash neither runs this
    # tick again nor forgets that the run existed.
    claim = ledger.open_run(info)
    if claim is None:
        # A fleet job: its ledger asks the fleet first. A refusal (NotClaimed) or a cancel
        # while it asks leaves before the run is counted; nothing is on record then.
        info.claim = CLAIMING
        info.claim = await ledger.claim(info)
        if claimed is not None:
            claimed(info)
    rt.stats.running += 1
    try:
        while True:
            if rt.listeners:
                _emit_started(rt, info)
            try:
                info.result = _checked(rt, info, await _attempt(rt, spec, info))
                info.outcome = SUCCEEDED
                info.error = None
                break
            except asyncio.CancelledError as exc:
                if _cancelled(info, exc):
                    raise
            except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the run's failure
                _failed(rt, spec, info, exc)
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
        rt.defer(_finish, rt, spec, info, ledger)
    return info


async def execute_fast(rt: Runtime, spec: JobSpec, info: RunInfo, ledger: Ledger) -> RunInfo:
    """:func:`execute` for a job on the fused path (``spec.fast``: io, no timeout, no
    retries), the same outcome, events and end, with fewer frames: one attempt, the job
    awaited directly. The caller has put the run's start on record already:
    ``Ledger.advance_and_open``, with its tick, in one write."""
    jt = spec.jobtype
    assert jt is not None
    rt.stats.running += 1
    try:
        if rt.listeners:
            _emit_started(rt, info)
        ctx = JobContext.for_run(info.job, info.run_id, 1, info.scheduled, rt)
        try:
            try:
                result = await jt.func(ctx, **spec.kwargs)
            finally:
                if ctx._scope is not None:
                    ctx.release_resources()
            info.result = _checked(rt, info, result)
            info.outcome = SUCCEEDED
        except asyncio.CancelledError as exc:
            if _cancelled(info, exc):
                raise
        except BaseException as exc:  # as in execute
            _failed(rt, spec, info, exc)
    finally:
        rt.stats.running -= 1
        info.ended = time.time()
        rt.defer(_finish, rt, spec, info, ledger)
    return info


def _emit_started(rt: Runtime, info: RunInfo) -> None:
    """The STARTED event of the run's current attempt (for listeners: callers check first)."""
    rt.emit(
        JobEvent(
            EventKind.STARTED,
            info.job,
            info.run_id,
            _utc(info.scheduled),
            info.attempt,
            time.time(),
        )
    )


def _cancelled(info: RunInfo, exc: asyncio.CancelledError) -> bool:
    """Record an attempt that ended in CancelledError; True when it is a real cancel (the
    caller re-raises it)."""
    me = asyncio.current_task()
    if me is not None and me.cancelling() == 0:
        # Nobody cancelled us: the job raised CancelledError itself (a library leaking one).
        # That is the job's failure, not a reason to stop.
        info.outcome, info.error = FAILED, _error_text(exc) + " (raised by the job)"
        return False
    info.outcome = CANCELLED
    info.error = info.cancel_reason or "cancelled"
    return True


def _failed(rt: Runtime, spec: JobSpec, info: RunInfo, exc: BaseException) -> None:
    """Record an attempt that raised (a JobTimeout, or anything else: the run's failure)."""
    if isinstance(exc, JobTimeout):
        info.outcome, info.error = TIMED_OUT, cut(str(exc))
        return
    info.outcome, info.error = FAILED, _error_text(exc, _label(spec, info))
    if not isinstance(exc, Exception):
        rt.log.warning(
            "job_raised_base_exception",
            job=spec.config.name,
            run_id=info.run_id,
            error=info.error,
        )


def never_claimed(info: RunInfo, ledger: Ledger) -> bool:
    """The run's ledger may refuse runs and never granted this one (its task was cancelled
    before ``execute`` asked, or while it asked): the run was never opened, and leaves no
    record. A host run is granted by the first step of ``execute``."""
    return info.claim is CLAIMING or (ledger.may_refuse and info.claim is HOST_CLAIM)


def cancelled_before_start(rt: Runtime, spec: JobSpec, info: RunInfo, ledger: Ledger) -> bool:
    """Record a run whose task was cancelled before it took its first step (so ``execute``
    never ran): it ends as cancelled, with a log line and a history row like any other.
    False, and nothing recorded, for a run :func:`never_claimed`: it never opened, so there
    is no run to end (the caller skips its tick instead)."""
    if never_claimed(info, ledger):
        return False
    info.outcome = CANCELLED
    info.error = info.cancel_reason or "cancelled"
    info.ended = time.time()
    rt.defer(_finish, rt, spec, info, ledger)
    return True


def _label(spec: JobSpec, info: RunInfo) -> str:
    return f"job {spec.config.name!r} run {info.run_id}"


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _finish(rt: Runtime, spec: JobSpec, info: RunInfo, ledger: Ledger) -> None:
    """Hand the ended run to every sink (taskd.run.sinks), each on its own: one that raises
    is logged and the rest still run."""
    end = RunEnd.of(spec, info, ledger)
    for sink in rt.sinks:
        try:
            sink.run_ended(end)
        except Exception:  # bookkeeping must never lose the other sinks' work
            rt.log.exception("sink_failed", sink=type(sink).__name__, job=spec.config.name)
