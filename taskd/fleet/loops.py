"""The FleetLedger's tasks: the heartbeat (keeps this node's claims alive, learns which were
taken over), the sweep (takes over or abandons claims whose owner died, refreshes what status
shows, prunes old rows) and the writer (writes finished runs, retrying while the claim is
still trusted). Each survives a database outage: a call fails fast (FleetDown), the loop
waits for its next turn, and the connection's own reconnect brings the database back."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import structlog

from taskd.fleet.conn import FleetDown
from taskd.fleet.held import Held, boottime

if TYPE_CHECKING:
    from taskd.fleet.db import Swept
    from taskd.fleet.ledger import FleetLedger
    from taskd.run.sinks import RunEnd

log = structlog.get_logger("taskd.fleet")

SKEW_WARN: Final = 1.0  # |DB clock - host clock| above this logs clock_skew once per episode
PRUNE_EVERY: Final = 60  # sweeps between two retention passes
# A finish's state that gives the claim back unended (its attempts field: takeovers to undo).
HAND_BACK: Final = "handback"
WRITE_BATCH: Final = 500  # finishes written in one statement at most


def start(ledger: FleetLedger) -> list[asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    return [
        loop.create_task(_forever(heartbeat, ledger), name="taskd-fleet-heartbeat"),
        loop.create_task(_forever(sweep, ledger), name="taskd-fleet-sweep"),
        loop.create_task(writer(ledger), name="taskd-fleet-writer"),
    ]


async def _forever(step: Callable[[FleetLedger], Awaitable[None]], ledger: FleetLedger) -> None:
    """Run ``step`` at its interval; its failures are logged, never the end of the loop."""
    every = ledger.lease / 3 if step is heartbeat else ledger.cfg.sweep
    while True:
        await asyncio.sleep(every)
        if ledger.db.state != "up":
            continue
        try:
            await step(ledger)
        except FleetDown:
            continue  # down now; the reconnect is under way
        except Exception:
            log.exception("fleet_loop_failed", loop=getattr(step, "__name__", "?"))


async def heartbeat(ledger: FleetLedger) -> None:
    """Extend every claim held (one statement), and cancel the runs of those not kept."""
    fences = [h.fence for h in ledger.held.values() if not h.lost]
    sent = boottime()
    beat = await ledger.db.heartbeat(fences)
    until = sent + ledger.lease - ledger.margin
    for fence in fences:
        held = ledger.held.get(fence)
        if held is None:
            continue  # written and released meanwhile
        if fence in beat.kept:
            held.valid_until = max(held.valid_until, until)
        elif not held.ended:
            ledger.lose(held, f"fence {fence} taken over by the fleet")
    if abs(beat.offset) > SKEW_WARN and abs(ledger.skew) <= SKEW_WARN:
        log.warning("clock_skew", node=ledger.node, offset=round(beat.offset, 3),
                    hint="leases use the database's clock; this host's ticks fire off by this")  # fmt: skip
    ledger.skew = beat.offset
    ledger.arm_deadline()


async def sweep(ledger: FleetLedger) -> None:
    """Take over (or abandon) expired claims of the jobs this node knows."""
    jobs = list(ledger.jobs)
    if not jobs or ledger.draining:
        return  # stopping: a tick taken over now could not run here
    sent = boottime()
    mine = [h.fence for h in ledger.held.values() if not h.lost]
    # Claims given back lately: left to the other nodes for a lease (then ours again, if
    # no one took them: this node may run them by then).
    ledger.handed_back = {f: t for f, t in ledger.handed_back.items() if t > sent}
    mine += list(ledger.handed_back)
    for row in await ledger.db.sweep(jobs, mine):
        _swept(ledger, row, sent + ledger.lease - ledger.margin)
    ledger.running = {r["job"]: r for r in await ledger.db.running(jobs)}
    ledger.sweeps += 1
    if ledger.history_max_age is not None and ledger.sweeps % PRUNE_EVERY == 0:
        # A tick stays claimable for the claim window (catch-up) or the job's grace
        # (scheduled): its row is kept that long, and a lease more (hosts' clocks differ).
        windows = [ledger.cfg.claim_window, *(c.grace for c in ledger.jobs.values())]
        await ledger.db.prune(ledger.history_max_age, claimable=max(windows) + ledger.lease)


def _swept(ledger: FleetLedger, row: Swept, valid_until: float) -> None:
    from taskd.ledger import Claim

    if row.state != "running":
        # abandoned; or cancelled: the job is paused fleet-wide, so not run again.
        log.warning("run_abandoned", job=row.job, tick=row.tick, fence=row.fence,
                    state=row.state, lost_owners=list(row.lost_owners))  # fmt: skip
        return
    log.info("fleet_takeover", job=row.job, tick=row.tick, fence=row.fence,
             lost_owners=list(row.lost_owners), node=ledger.node)  # fmt: skip
    key = (row.job, row.tick)
    ledger.granted[key] = (Claim(row.fence, ledger.node, row.lease_until), valid_until)
    reason = None
    if ledger.scheduler is None:
        reason = "no scheduler"
    else:
        try:
            reason = ledger.scheduler.take_over(row.job, row.tick)
        except LookupError:
            reason = "removed"
    if reason is None:
        return
    ledger.granted.pop(key, None)
    held = Held(row.job, row.fence, row.tick, "", valid_until, ended=True)
    ledger.held[row.fence] = held
    why = f"not taken over by {ledger.node}: {reason}"
    if reason == "paused":
        # Paused fleet-wide (a pause here is the fleet's): the tick is not run anywhere.
        ledger.queue(held, None, ("cancelled", 0, 0.0, why, None))
    else:
        # Only this node cannot run it (stopping, the job broken or removed here): give it
        # back unended, for another node's sweep.
        ledger.queue(held, None, (HAND_BACK, 1, 0.0, why, None))


async def writer(ledger: FleetLedger) -> None:
    """Write the finished runs: all those queued by now in one statement (a host behind on
    its finishes catches up in one round trip, not one per run); each alone when the batch
    fails, retried with backoff while the database is down, until the claim's local
    deadline (past it the tick may be another host's, and the result goes)."""
    while True:
        items = [await ledger.writes.get()]
        while len(items) < WRITE_BATCH and not ledger.writes.empty():
            items.append(ledger.writes.get_nowait())
        left = list(items)  # not yet recorded
        try:
            rest = await _write_batch(ledger, items)
            left = list(rest)
            for item in rest:
                await _write_one(ledger, *item)
                left.remove(item)
        except asyncio.CancelledError:
            # Stopping (close()): the finishes not recorded yet go back to the queue, which
            # close() puts on this host's record, as it does the ones never taken.
            for item in left:
                ledger.writes.put_nowait(item)
            raise
        finally:
            for held, _, _ in items:
                ledger.written(held)
                ledger.writes.task_done()


Item = tuple["Held", "RunEnd | None", tuple[Any, ...]]


async def _write_batch(ledger: FleetLedger, items: list[Item]) -> list[Item]:
    """Write the finishes of ``items`` in one statement if there are two or more; returns
    those left to write one by one (hand-backs; all of them if the statement failed: a
    value the database refuses, or the database gone, is then dealt with per run)."""
    batch = [it for it in items if it[2][0] != HAND_BACK]
    if len(batch) < 2:
        return items
    rows = [
        (held.fence, state, attempts, duration, error, result,
         held.job if result is not None else None)
        for held, _, (state, attempts, duration, error, result) in batch
    ]  # fmt: skip
    try:
        verdicts = await ledger.db.finish_many(rows)
    except FleetDown:
        return items
    except Exception as exc:
        log.warning("fleet_finish_batch_refused", runs=len(batch),
                    error=f"{type(exc).__name__}: {exc}", retry="each run alone")  # fmt: skip
        return items
    for (held, end, _), (ended, wrote) in zip(batch, verdicts, strict=True):
        ledger.recorded(held, end, _verdict(held, ended, wrote))
    return [it for it in items if it[2][0] == HAND_BACK]


async def _write_one(ledger: FleetLedger, held: Held, end: RunEnd | None,
                     values: tuple[Any, ...]) -> None:  # fmt: skip
    state, attempts, duration, error, result_json = values
    try:
        discarded = await _write(ledger, held, state, attempts, duration, error, result_json)
    except Exception as exc:
        # Refused even as a bare failure: the fleet's row is still running. Never count
        # that as kept (the tick would expire and run again elsewhere): the claim stays
        # held and heartbeating, so no other host re-runs the tick while this one lives.
        log.exception("fleet_finish_failed", job=held.job, fence=held.fence,
                      hint="the claim is held until this taskd stops")  # fmt: skip
        ledger.recorded(held, end, f"the fleet database refused the finish ({exc})",
                        release=False)  # fmt: skip
    else:
        ledger.recorded(held, end, discarded)


async def _write(
    ledger: FleetLedger,
    held: Held,
    state: str,
    attempts: int,
    duration: float,
    error: str | None,
    result_json: str | None,
) -> str | None:
    """Write the finish; None when the fleet kept it, else why it did not. Values the
    database refuses (NaN in jsonb, a NUL in text) are written again cleaned, and if even
    that is refused, as a bare failure: raises only when that is refused too."""
    if state == HAND_BACK:
        return await _hand_back(ledger, held, undo=attempts, why=error or "")
    delay = 0.2
    tries = 0
    while True:
        try:
            ended, wrote = await ledger.db.finish(
                held.fence, held.job, state, attempts=attempts, duration=duration,
                error=error, result_json=result_json,
                result_key=held.job if result_json is not None else None,
            )  # fmt: skip
            break
        except FleetDown as exc:
            if held.lost or boottime() + delay >= held.valid_until:
                return f"the database was unreachable until the claim ran out ({exc})"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        except Exception as exc:
            tries += 1
            if tries > 2:
                raise
            log.warning("fleet_finish_refused", job=held.job, fence=held.fence,
                        error=f"{type(exc).__name__}: {exc}",
                        retry="cleaned values" if tries == 1 else "a bare failure")  # fmt: skip
            if tries == 1:
                error, result_json = _clean_text(error), _clean_json(result_json)
            else:
                state, result_json = "failed", None
                error = _clean_text(f"the fleet database refused this run's finish: {exc}")
    return _verdict(held, ended, wrote)


def _verdict(held: Held, ended: bool, wrote: bool | None) -> str | None:
    if not ended:
        return f"fence {held.fence} was taken over"
    if wrote is False:
        log.warning("fenced_write_refused", job=held.job, fence=held.fence, key=held.job)
    return None


async def _hand_back(ledger: FleetLedger, held: Held, *, undo: int, why: str) -> str:
    """Give the claim back unended; always "discarded": the fleet did not keep a run. If
    that fails, the claim is released all the same: its lease runs out, and another node
    takes it over then (the takeover this node counted stays counted)."""
    delay = 0.2
    while True:
        try:
            back = await ledger.db.hand_back(held.fence, undo=undo)
            break
        except FleetDown:
            if held.lost or boottime() + delay >= held.valid_until:
                return f"not handed back, the database was unreachable ({why})"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        except Exception:
            log.exception("fleet_hand_back_failed", job=held.job, fence=held.fence)
            return f"not handed back ({why}); its lease runs out"
    if back:
        ledger.handed_back[held.fence] = boottime() + ledger.lease
        log.info("fleet_handed_back", job=held.job, fence=held.fence, why=why)
    return f"handed back to the fleet ({why})"


def _clean_text(text: str | None) -> str | None:
    """``text`` as PostgreSQL's text takes it: no NUL, no lone surrogate."""
    if text is None:
        return None
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _clean_json(result_json: str | None) -> str | None:
    """``result_json`` as jsonb takes it: NaN and Infinity as their repr strings, strings
    cleaned as :func:`_clean_text`; None if it is no JSON at all."""
    if result_json is None:
        return None
    try:
        return json.dumps(_scrub(json.loads(result_json)), allow_nan=False)
    except ValueError:
        return None


def _scrub(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_clean_text(str(k)): _scrub(v) for k, v in value.items()}
    return value
