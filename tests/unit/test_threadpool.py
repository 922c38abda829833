"""ThreadPool (taskd.run.threadpool) and ThreadRunner: stuck threads are replaced up to the cap,
past it the pool is exhausted and refuses calls, and returning calls give the capacity back."""

from __future__ import annotations

import asyncio
import contextlib
import random
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from taskd.config import load_config
from taskd.config.model import JobConfig
from taskd.errors import ConfigError, JobTimeout, ThreadPoolExhausted
from taskd.jobspec import JobSpec, make_trigger
from taskd.plugin.jobtype import JobType
from taskd.plugin.manager import PluginHost
from taskd.run.events import SkipReason
from taskd.run.executors import ThreadRunner
from taskd.run.runtime import Runtime
from taskd.run.threadpool import ThreadPool, Work
from taskd.schedule.job import ScheduledJob
from taskd.schedule.manual import ManualRun
from taskd.state.shared import SharedState
from tests.unit.test_scheduler import stop, wait_until

pytestmark = pytest.mark.timeout(30)


def until(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"not met within {timeout}s"
        time.sleep(0.005)
    return value


class Gate:
    """Calls that block until the test opens the gate (as a hung job would, for ever)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Semaphore(0)

    def call(self, value: Any = None) -> Callable[[], Any]:
        def fn() -> Any:
            self.entered.release()
            self.open.wait(20)
            return value

        return fn

    def wait_entered(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=10), "the call never started"


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open.set()  # no thread outlives the test


def count(logs: list[dict[str, Any]], event: str) -> int:
    return [e["event"] for e in logs].count(event)


def hang(pool: ThreadPool, gate: Gate, label: str = "hung") -> Work:
    """A call that starts and is then given up on: its thread is stuck."""
    work = pool.submit(gate.call(label), label)
    gate.wait_entered()
    assert pool.give_up(work)
    return work


class TestReplacement:
    """A stuck thread is replaced while the cap allows, and only then."""

    def test_calls_run_beside_stuck_threads(self, gate: Gate) -> None:
        pool = ThreadPool(1, 3)
        hang(pool, gate)
        hang(pool, gate)
        assert pool.submit(lambda: 42, "quick").future.result(5) == 42
        status = pool.status()
        assert (status.stuck, status.alive, status.exhausted) == (2, 3, None)

    def test_without_replacement_a_call_waits_behind_busy_threads(self, gate: Gate) -> None:
        pool = ThreadPool(1, 3)
        busy = pool.submit(gate.call("busy"), "busy")
        gate.wait_entered()
        waiting = pool.submit(lambda: "next", "next")
        time.sleep(0.05)
        # A busy thread that nobody gave up on is not replaced: the call queues, as before.
        assert not waiting.future.done()
        assert pool.status().queued == 1 and pool.status().alive == 1
        gate.open.set()
        assert waiting.future.result(5) == "next" and busy.future.result(5) == "busy"

    def test_giving_up_on_a_busy_call_starts_its_replacement(self, gate: Gate) -> None:
        pool = ThreadPool(1, 2)
        busy = pool.submit(gate.call(), "busy")
        gate.wait_entered()
        waiting = pool.submit(lambda: "next", "next")
        pool.give_up(busy)
        assert waiting.future.result(5) == "next"

    def test_queued_call_given_up_never_runs_and_is_not_stuck(self, gate: Gate) -> None:
        pool = ThreadPool(1, 2)
        pool.submit(gate.call(), "busy")
        gate.wait_entered()
        ran = threading.Event()
        queued = pool.submit(ran.set, "queued")
        assert not pool.give_up(queued)
        assert queued.future.cancelled() and pool.stuck_count == 0
        gate.open.set()
        assert pool.submit(lambda: 1, "after").future.result(5) == 1
        assert not ran.is_set()

    def test_give_up_after_the_call_returned_is_a_no_op(self) -> None:
        pool = ThreadPool(1, 2)
        work = pool.submit(lambda: 1, "done")
        assert work.future.result(5) == 1
        until(lambda: work.state == "done")
        assert not pool.give_up(work)
        assert pool.stuck_count == 0 and pool.stuck_total == 0

    def test_a_base_exception_is_the_calls_result(self) -> None:
        pool = ThreadPool(1, 2)

        def leave() -> None:
            raise SystemExit(3)

        with pytest.raises(SystemExit):
            pool.submit(leave, "exit").future.result(5)
        assert pool.submit(lambda: "alive", "next").future.result(5) == "alive"

    def test_a_thread_that_cannot_start_fails_the_call_not_later(
        self, gate: Gate, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pool = ThreadPool(1, 3)
        busy = pool.submit(gate.call(), "busy")
        gate.wait_entered()
        waiting = pool.submit(lambda: "next", "next")

        def no_thread(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", no_thread)
        with capture_logs() as logs:
            assert pool.give_up(busy)  # its replacement cannot start: logged, not raised
        assert count(logs, "thread_start_failed") == 1
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.submit(lambda: "never", "refused")
        assert pool.status().queued == 1  # only "next", which waits for a thread
        monkeypatch.undo()
        gate.open.set()
        assert waiting.future.result(5) == "next"

    def test_workers_above_the_cap_is_a_bug(self) -> None:
        with pytest.raises(ValueError, match="workers <= limit"):
            ThreadPool(4, 3)


class TestExhausted:
    """Every thread the cap allows is stuck: calls are refused, said once, until one returns."""

    def test_refused_and_reported_then_recovered(self, gate: Gate) -> None:
        pool = ThreadPool(1, 2)
        with capture_logs() as logs:
            hang(pool, gate, "job 'a' run 1")
            assert not pool.exhausted
            hang(pool, gate, "job 'a' run 2")
            assert pool.exhausted
            with pytest.raises(ThreadPoolExhausted, match="2 of 2 threads are stuck"):
                pool.submit(lambda: 1, "refused")
            with pytest.raises(ThreadPoolExhausted):
                pool.submit(lambda: 1, "refused again")
            why = pool.status().exhausted
            assert why is not None and "the oldest is job 'a' run 1" in why
            assert "thread_workers_max" in why
            gate.open.set()
            # Logged by the returning threads, after the pool's counters changed.
            until(
                lambda: count(logs, "thread_pool_recovered") and count(logs, "thread_unstuck") == 2
            )
            assert not pool.exhausted and pool.stuck_count == 0
            assert pool.submit(lambda: "back", "back").future.result(5) == "back"
        assert count(logs, "thread_pool_exhausted") == 1
        assert count(logs, "thread_stuck") == 2
        assert count(logs, "thread_pool_recovered") == 1
        assert pool.exhausted_total == 1 and pool.stuck_total == 2

    def test_calls_waiting_when_it_becomes_exhausted_fail_at_once(self, gate: Gate) -> None:
        pool = ThreadPool(1, 1)
        busy = pool.submit(gate.call(), "busy")
        gate.wait_entered()
        waiting = pool.submit(lambda: 1, "waiting")
        pool.give_up(busy)
        assert pool.exhausted
        with pytest.raises(ThreadPoolExhausted):
            waiting.future.result(5)

    def test_one_return_ends_the_episode_and_a_new_one_is_reported_again(self, gate: Gate) -> None:
        pool = ThreadPool(1, 1)
        with capture_logs() as logs:
            hang(pool, gate)
            gate.open.set()
            until(lambda: not pool.exhausted)
            second = Gate()
            try:
                hang(pool, second)
                assert pool.exhausted
            finally:
                second.open.set()
            until(lambda: not pool.exhausted)
        assert count(logs, "thread_pool_exhausted") == 2
        assert pool.exhausted_total == 2


class TestGivingBack:
    """When stuck calls return, the extra threads exit: the pool does not grow for ever."""

    def test_threads_shrink_back_to_workers(self, gate: Gate) -> None:
        pool = ThreadPool(2, 6)
        for _ in range(4):
            hang(pool, gate)
        calls = [pool.submit(lambda: time.sleep(0.01), "busy") for _ in range(4)]
        for work in calls:
            work.future.result(5)
        assert pool.status().alive == 6  # 4 stuck, 2 replacing them
        gate.open.set()
        until(lambda: pool.status().alive == 2)
        assert pool.status().stuck == 0

    def test_repeated_hangs_never_grow_past_the_cap(self) -> None:
        pool = ThreadPool(2, 4)
        for _ in range(5):
            gate = Gate()
            for _ in range(3):
                hang(pool, gate)
            assert pool.status().alive <= 4
            gate.open.set()
            until(lambda: pool.stuck_count == 0)
        until(lambda: pool.status().alive <= 2)

    def test_many_calls_with_random_give_ups_all_settle(self) -> None:
        pool = ThreadPool(3, 6)
        rng = random.Random(8)
        works = [pool.submit(lambda: time.sleep(rng.random() / 500), str(i)) for i in range(300)]
        for work in works[::7]:
            pool.give_up(work)
            assert pool.status().alive <= 6
        for work in works:
            if not work.future.cancelled():
                # A burst of give-ups may exhaust the pool for a moment: those fail at once.
                with contextlib.suppress(ThreadPoolExhausted):
                    work.future.result(10)
        until(lambda: pool.stuck_count == 0 and pool.status().alive <= 3)
        assert not pool.exhausted


class TestShutdown:
    """Shutdown never waits for a stuck thread, cancels what is queued and refuses more."""

    def test_shutdown_returns_at_once(self, gate: Gate) -> None:
        pool = ThreadPool(1, 1)
        busy = pool.submit(gate.call(), "busy")
        gate.wait_entered()
        pool.give_up(busy)
        began = time.monotonic()
        pool.shutdown()
        assert time.monotonic() - began < 1.0
        with pytest.raises(RuntimeError, match="shut down"):
            pool.submit(lambda: 1, "late")
        gate.open.set()
        until(lambda: pool.status().alive == 0)

    def test_queued_calls_are_cancelled(self, gate: Gate) -> None:
        pool = ThreadPool(1, 2)
        pool.submit(gate.call(), "busy")
        gate.wait_entered()
        queued = pool.submit(lambda: 1, "queued")
        pool.shutdown()
        assert queued.future.cancelled()


class TestThreadRunner:
    """The asyncio side: a timeout or a cancel leaves the call stuck, counted and replaced."""

    async def test_timeout_marks_stuck_and_the_next_run_gets_a_thread(self, gate: Gate) -> None:
        runner = ThreadRunner(1)
        assert runner.limit == 2  # the default cap: twice the workers
        with pytest.raises(JobTimeout, match=r"timed out after 0\.05s"):
            await runner.run(gate.call(), {}, 0.05, "job 'h' run 1")
        assert runner.stuck_count == 1
        assert await runner.run(lambda: "ok", {}, 5.0, "job 'q' run 2") == "ok"
        with pytest.raises(JobTimeout):
            await runner.run(gate.call(), {}, 0.05, "job 'h' run 3")
        assert runner.exhausted
        with pytest.raises(ThreadPoolExhausted):
            await runner.run(lambda: "ok", {}, 5.0, "job 'q' run 4")
        assert runner.status().as_dict()["exhausted"] is not None
        gate.open.set()
        await asyncio.to_thread(until, lambda: not runner.exhausted)
        runner.shutdown()

    async def test_a_cancelled_to_thread_call_is_stuck(self, gate: Gate) -> None:
        runner = ThreadRunner(1, 3)
        task = asyncio.ensure_future(runner.call(gate.call()))
        await asyncio.to_thread(gate.wait_entered)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.stuck_count == 1
        assert await runner.call(lambda x: x + 1, 1) == 2
        gate.open.set()
        await asyncio.to_thread(until, lambda: runner.stuck_count == 0)
        runner.shutdown()


class TestConfig:
    """[daemon] thread_workers_max: 0 (the default) or at least thread_workers."""

    def write(self, tmp_path: Path, text: str) -> Path:
        path = tmp_path / "taskd.toml"
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    def test_default_is_zero_meaning_twice_the_workers(self, tmp_path: Path) -> None:
        config = load_config(self.write(tmp_path, "[daemon]\nthread_workers = 3\n"))
        assert config.daemon.thread_workers_max == 0
        assert ThreadRunner(3, config.daemon.thread_workers_max).limit == 6

    def test_explicit_cap(self, tmp_path: Path) -> None:
        path = self.write(tmp_path, "[daemon]\nthread_workers = 3\nthread_workers_max = 3\n")
        assert load_config(path).daemon.thread_workers_max == 3

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("2", "must be at least thread_workers (3), got 2"),
            ('"8"', "expected a whole number, got a string"),
            ("8.0", "expected a whole number, got a float"),
            ("true", "expected a whole number, got a boolean"),
            ("-1", "must be from 0 to 4096"),
            ("5000", "must be from 0 to 4096"),
        ],
    )
    def test_bad_values(self, tmp_path: Path, value: str, message: str) -> None:
        path = self.write(tmp_path, f"[daemon]\nthread_workers = 3\nthread_workers_max = {value}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        (issue,) = info.value.issues
        assert (issue.path, issue.line) == ("daemon.thread_workers_max", 3)
        assert message in issue.message


class TestScheduling:
    """The scheduler skips blocking runs as ``exhausted``, also ticks that were queued."""

    def blocking_job(self, rt: Runtime, fn: Callable[[], Any], **cfg: Any) -> ScheduledJob:
        # Fired by hand only: a one-shot far in the future never fires on its own.
        config = JobConfig(name="b", type="t", schedule="at", at=4070908800.0, **cfg)
        spec = JobSpec(config, JobType("t", fn, kind="blocking"), make_trigger(config))
        job = ScheduledJob(spec, rt, cursor=None)
        job.start()
        return job

    async def test_queued_ticks_are_skipped_when_the_pool_becomes_exhausted(
        self, gate: Gate
    ) -> None:
        rt = Runtime(
            shared=SharedState(),
            host=PluginHost(),
            thread_workers=1,
            process_workers=1,
            thread_workers_max=1,
        )
        job = self.blocking_job(rt, gate.call(), overlap="queue", timeout=0.3)
        first, queued = ManualRun(), [ManualRun(), ManualRun()]
        assert job.trigger_now(first) is None
        await asyncio.to_thread(gate.wait_entered)
        for waiter in queued:
            assert job.trigger_now(waiter) is None and waiter.queued
        # The run in flight times out: its thread was the only one the cap allows.
        info = await asyncio.wait_for(first.ended, 5)
        assert not isinstance(info, SkipReason) and info.outcome == "timed_out"
        assert rt.threads.exhausted
        for waiter in queued:
            assert await asyncio.wait_for(waiter.ended, 5) is SkipReason.EXHAUSTED
        assert job.trigger_now() is SkipReason.EXHAUSTED
        gate.open.set()
        await wait_until(lambda: not rt.threads.exhausted)
        again = ManualRun()
        assert job.trigger_now(again) is None
        gate.open.set()
        ended = await asyncio.wait_for(again.ended, 5)
        assert not isinstance(ended, SkipReason) and ended.outcome == "succeeded"
        await stop(job, rt)
        rt.threads.shutdown()

    async def test_a_scheduled_tick_is_a_counted_skip(self, rt: Runtime, gate: Gate) -> None:
        hang = self.blocking_job(rt, gate.call(), timeout=0.05)
        for _ in range(rt.threads.limit):
            waiter = ManualRun()
            hang.trigger_now(waiter)
            await asyncio.wait_for(waiter.ended, 5)
        assert rt.threads.exhausted
        config = JobConfig(name="tick", type="t", schedule="every", every=0.05)
        spec = JobSpec(config, JobType("t", lambda: 1, kind="blocking"), make_trigger(config))
        with capture_logs() as logs:
            tick = ScheduledJob(spec, rt, cursor=None)
            tick.start()
            await wait_until(lambda: rt.stats.skips[("tick", "exhausted")] >= 2)
        skipped = [e for e in logs if e["event"] == "skipped"]
        assert skipped and all(e["reason"] == "exhausted" for e in skipped)
        assert not [e for e in logs if e["event"] == "run"]
        gate.open.set()
        await wait_until(lambda: rt.stats.outcomes[("tick", "succeeded")] >= 1)
        await stop(tick, rt)
        await stop(hang, rt)
        rt.threads.shutdown()
