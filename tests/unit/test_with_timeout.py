"""with_timeout: the timer around a timed attempt keeps asyncio.timeout's rules (which cancel
is whose, the task's cancel count afterwards) while costing less per run."""

from __future__ import annotations

import asyncio

import pytest

from taskd.errors import JobTimeout
from taskd.run.executors import with_timeout

pytestmark = pytest.mark.timeout(10)


async def _sleep_forever() -> None:
    await asyncio.sleep(3600)


class TestWithTimeout:
    """Outcomes of with_timeout, and the task's cancel count after each."""

    async def test_a_quick_awaitable_returns_its_value(self) -> None:
        async def quick() -> int:
            return 7

        assert await with_timeout(quick(), 5.0, "job 'j'") == 7
        assert await with_timeout(quick(), None, "job 'j'") == 7
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    async def test_past_the_timeout_it_raises_job_timeout_and_takes_its_cancel_back(
        self,
    ) -> None:
        with pytest.raises(JobTimeout, match=r"job 'j' timed out after 0\.01s"):
            await with_timeout(_sleep_forever(), 0.01, "job 'j'")
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    async def test_a_timeout_error_of_the_jobs_own_stays_its_own(self) -> None:
        async def raises() -> None:
            raise TimeoutError("the job's own")

        with pytest.raises(TimeoutError, match="the job's own") as info:
            await with_timeout(raises(), 5.0, "job 'j'")
        assert not isinstance(info.value, JobTimeout)

    async def test_a_job_that_turns_the_cancel_into_a_timeout_error_timed_out(self) -> None:
        async def converts() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise TimeoutError("converted") from None

        with pytest.raises(JobTimeout):
            await with_timeout(converts(), 0.01, "job 'j'")
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    async def test_a_job_that_swallows_the_cancel_returns_and_leaves_no_cancel_behind(
        self,
    ) -> None:
        async def swallows() -> str:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return "swallowed"
            return "slept"

        assert await with_timeout(swallows(), 0.01, "job 'j'") == "swallowed"
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0)  # no cancel left pending for this task either

    async def test_a_cancel_from_outside_stays_a_cancel(self) -> None:
        started = asyncio.Event()

        async def timed() -> None:
            started.set()
            await with_timeout(_sleep_forever(), 5.0, "job 'j'")

        task = asyncio.create_task(timed())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelling() == 1

    async def test_a_cancel_from_outside_as_the_timer_fires_stays_a_cancel(self) -> None:
        async def timed() -> None:
            await with_timeout(_sleep_forever(), 0.05, "job 'j'")

        task = asyncio.create_task(timed())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        # Both cancels land before the task's next step: the outside one must win.
        loop.call_later(0.05, task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelling() >= 1
