"""ctx.resource: opened once per job generation, shared by runs, retried after a failed
setup, closed when a reload retires the job (after its runs end) and at stop; closing never
raises into the daemon and is bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import structlog
from structlog.testing import capture_logs

from taskd.run import resources as resources_mod
from taskd.run.context import JobContext
from taskd.run.resources import ResourceClosed, Resources
from taskd.state.shared import SharedState

pytestmark = pytest.mark.timeout(20)


class Tracker:
    """An async context manager factory that counts what it opened and closed."""

    def __init__(self, *, fail_times: int = 0, close_error: bool = False, hang: bool = False):
        self.opened = 0
        self.closed = 0
        self.fail_times = fail_times
        self.close_error = close_error
        self.hang = hang
        self.entered = asyncio.Event()

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[str]:
        self.entered.set()
        await asyncio.sleep(0.01)  # a real connect takes a while: overlapping runs must share
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionRefusedError("server down")
        self.opened += 1
        n = self.opened
        try:
            yield f"conn-{n}"
        finally:
            if self.hang:
                await asyncio.sleep(3600)
            self.closed += 1
            if self.close_error:
                raise RuntimeError("close failed")


def ctx(res: Resources, job: str = "j") -> JobContext:
    return JobContext(
        job=job, run_id="r", attempt=1, scheduled=0.0, state=SharedState(), resources=res
    )


@pytest.fixture
def res() -> Resources:
    return Resources(structlog.get_logger("test"))


async def test_one_resource_shared_by_runs_and_overlapping_runs(res: Resources) -> None:
    t = Tracker()
    a, b = ctx(res), ctx(res)
    got = await asyncio.gather(a.resource("db", t), b.resource("db", t))
    assert got == ["conn-1", "conn-1"] and t.opened == 1
    a.release_resources()
    b.release_resources()
    c = ctx(res)
    assert await c.resource("db", t) == "conn-1"
    c.release_resources()
    assert t.closed == 0 and res.open_count() == 1


async def test_keys_are_separate_and_jobs_are_separate(res: Resources) -> None:
    t = Tracker()
    a = ctx(res, "a")
    assert await a.resource("one", t) == "conn-1"
    assert await a.resource("two", t) == "conn-2"
    b = ctx(res, "b")
    assert await b.resource("one", t) == "conn-3"
    assert res.open_count() == 3


async def test_failed_setup_keeps_nothing_and_next_run_retries(res: Resources) -> None:
    t = Tracker(fail_times=1)
    a = ctx(res)
    with pytest.raises(ConnectionRefusedError):
        await a.resource("db", t)
    a.release_resources()
    assert res.open_count() == 0
    b = ctx(res)
    assert await b.resource("db", t) == "conn-1"


async def test_cancelled_setup_keeps_nothing(res: Resources) -> None:
    t = Tracker()
    a = ctx(res)
    task = asyncio.ensure_future(a.resource("db", t))
    await t.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    a.release_resources()
    assert res.open_count() == 0 and t.opened == 0


async def test_retired_scope_closes_after_its_last_run(res: Resources) -> None:
    t = Tracker()
    running = ctx(res)
    assert await running.resource("db", t) == "conn-1"
    res.retire("j")  # a reload changed the job while a run uses the pool
    fresh = ctx(res)
    assert await fresh.resource("db", t) == "conn-2"  # the new generation opens its own
    await asyncio.sleep(0.05)
    assert t.closed == 0  # the old run still holds conn-1
    with capture_logs() as logs:
        running.release_resources()
        for _ in range(20):
            await asyncio.sleep(0.01)
            if t.closed:
                break
    assert t.closed == 1
    assert any(e["event"] == "resources_closed" and e["resources"] == ["db"] for e in logs)
    assert res.open_count() == 1


async def test_retire_without_runs_closes_at_once(res: Resources) -> None:
    t = Tracker()
    a = ctx(res)
    await a.resource("db", t)
    a.release_resources()
    res.retire("j")
    await asyncio.sleep(0.05)
    assert t.closed == 1 and res.open_count() == 0


async def test_close_all_closes_everything_and_refuses_more(res: Resources) -> None:
    t = Tracker()
    held = ctx(res, "a")
    await held.resource("db", t)
    other = ctx(res, "b")
    await other.resource("db", t)
    other.release_resources()
    await res.close_all()
    assert t.closed == 2
    late = ctx(res, "c")
    with pytest.raises(ResourceClosed):
        await late.resource("db", t)


async def test_close_failure_and_hang_are_logged_not_raised(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources_mod, "CLOSE_TIMEOUT", 0.2)
    bad, stuck = Tracker(close_error=True), Tracker(hang=True)
    a, b = ctx(res, "bad"), ctx(res, "stuck")
    await a.resource("x", bad)
    await b.resource("x", stuck)
    with capture_logs() as logs:
        await asyncio.wait_for(res.close_all(), 5)
    events = {e["event"]: e for e in logs}
    assert events["resource_close_failed"]["job"] == "bad"
    assert "close failed" in events["resource_close_failed"]["error"]
    assert events["resource_close_timeout"]["job"] == "stuck"


async def test_factory_must_return_an_async_context_manager(res: Resources) -> None:
    a = ctx(res)
    with pytest.raises(TypeError, match="async context manager"):
        await a.resource("db", lambda: object())  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="non-empty string"):
        await a.resource("", Tracker())


async def test_context_outside_a_daemon_has_its_own_registry() -> None:
    t = Tracker()
    c = JobContext(job="j", run_id="r", attempt=1, scheduled=0.0, state=SharedState())
    assert await c.resource("db", t) == "conn-1"
    assert await c.resource("db", t) == "conn-1"
    assert t.opened == 1
