"""The scheduler's hooks for a fleet ledger (issue 10): start a taken-over run of a given
tick (Cause.TAKEOVER, past the local overlap check but not a pause), cancel one run whose
claim was lost, and run what ``catchup`` picks of the ticks skipped while the fleet was down
(counted once, when they were skipped)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from taskd.config.model import JobConfig
from taskd.jobspec import JobSpec, make_trigger
from taskd.ledger import LocalLedger
from taskd.plugin.jobtype import JobType
from taskd.plugin.manager import PluginHost
from taskd.run.events import Cause, Outcome, SkipReason
from taskd.run.runtime import Runtime
from taskd.schedule.job import ScheduledJob
from taskd.schedule.jobset import JobSet
from taskd.state.shared import SharedState
from taskd.state.store import StateStore


def _runtime(store: StateStore) -> Runtime:
    return Runtime(
        shared=SharedState(),
        host=PluginHost(),
        thread_workers=1,
        process_workers=1,
        ledger=LocalLedger(store),
    )


def _spec(func: Callable[..., Any], **cfg: Any) -> JobSpec:
    cfg.setdefault("schedule", "every")
    cfg.setdefault("every", 3600.0)
    config = JobConfig(name="j", type="t", **cfg)
    return JobSpec(config, JobType("t", func), make_trigger(config))


async def _until(pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_take_over_runs_the_tick_past_overlap_but_not_pause(store: StateStore) -> None:
    rt = _runtime(store)
    seen: list[tuple[float, str]] = []
    gate = asyncio.Event()

    async def func(ctx: Any) -> None:
        seen.append((ctx.scheduled.timestamp(), ctx.run_id))
        await gate.wait()

    job = ScheduledJob(_spec(func, overlap="skip"), rt, cursor=time.time())
    jobs = JobSet(rt)
    jobs.jobs["j"] = job
    assert jobs.take_over("j", 1000.0) is None
    # A second one while the first runs: the fleet already checked overlap when the tick
    # was first claimed, so it runs too.
    assert jobs.take_over("j", 2000.0) is None
    await _until(lambda: len(seen) == 2)
    assert sorted(t for t, _ in seen) == [1000.0, 2000.0]
    assert {info.cause for _, info in job.active.values()} == {Cause.TAKEOVER}
    # Cancel one of them alone.
    run_id = seen[0][1]
    assert jobs.cancel_run("j", run_id, "claim lost: fence 7") is True
    await _until(lambda: run_id not in job.active)
    assert len(job.active) == 1
    assert jobs.cancel_run("j", run_id, "again") is False
    gate.set()
    await _until(lambda: not job.active)
    await rt.settle()
    assert rt.stats.outcomes[("j", Outcome.CANCELLED)] == 1
    assert rt.stats.outcomes[("j", Outcome.SUCCEEDED)] == 1
    await store.durable()
    causes = {r["trigger"] for r in store.history("j", limit=10)}
    assert causes == {"takeover"}
    # Paused: no run, the reason instead.
    job.set_paused(True)
    assert jobs.take_over("j", 3000.0) is SkipReason.PAUSED
    assert not job.active


@pytest.mark.parametrize("catchup", ["latest", "all", "none"])
async def test_catch_up_runs_what_catchup_picks_of_skipped_ticks(
    store: StateStore, catchup: str
) -> None:
    rt = _runtime(store)
    ran: list[float] = []

    async def func(ctx: Any) -> None:
        ran.append(ctx.scheduled.timestamp())

    now = time.time()
    spec = _spec(func, every=3600.0, catchup=catchup, grace=1.0)
    job = ScheduledJob(spec, rt, cursor=now)
    job.start()
    try:
        await asyncio.sleep(0)
        assert spec.trigger is not None
        # Four ticks, already handled (skipped while the fleet was down), an hour apart:
        # no tick of the schedule comes during the test.
        first = spec.trigger.next_after(now - 4 * 3600)
        assert first is not None
        skipped = [first + 3600 * i for i in range(4)]
        job.catch_up(skipped[0], skipped[-1])
        if catchup == "none":
            await asyncio.sleep(0.2)
            # Late ones are not run (one within grace would be, as on time).
            assert not set(ran) & {t for t in skipped if now - t > 1.0}
        else:
            want = skipped[-1:] if catchup == "latest" else skipped
            await _until(lambda: len(ran) == len(want))
            assert ran == want
        assert not rt.stats.skips  # counted when they were skipped, not again
        assert job.cursor == now  # already past them
    finally:
        job.stop()
        job.cancel_runs("test over")
        if job.task is not None:
            await asyncio.wait([job.task], timeout=2)
        await rt.settle()
