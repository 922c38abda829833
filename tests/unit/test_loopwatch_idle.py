"""An idle loop's watch parks: no probe timer, and a watchdog thread with no deadline, so an
idle daemon wakes only when something is due. Whatever starts work (poke, beat, busy, CPU on
the loop) arms it again, and a block that then starts is still reported."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import structlog
import uvloop

from taskd.observe.loopwatch import IDLE_CPU, LoopWatch

THRESHOLD = 0.1
INTERVAL = 0.02


def no_runs(job: str) -> list[str]:
    return []


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def counting(watch: LoopWatch) -> list[int]:
    """Count the watchdog thread's looks (each is one wake-up of the thread)."""
    looks = [0]
    real = watch._check

    def counted() -> None:
        looks[0] += 1
        real()

    watch._check = counted  # type: ignore[method-assign]
    return looks


async def until(check: Any, timeout: float = 5.0) -> None:
    """Let the loop turn until check() is true."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(INTERVAL / 2)


def hold(seconds: float) -> None:
    """Plugin-like code that holds the loop."""
    time.sleep(seconds)


def idle_watch(busy: list[bool] | None = None) -> LoopWatch:
    watch = LoopWatch(THRESHOLD, no_runs, interval=INTERVAL)
    flag = busy if busy is not None else [False]
    watch.busy = lambda: flag[0]
    return watch


@pytest.mark.timeout(20)
class TestParked:
    async def test_an_idle_loop_parks_the_probe_and_the_watchdog(self) -> None:
        watch = idle_watch()
        looks = counting(watch)
        watch.start(asyncio.get_running_loop())
        try:
            await until(lambda: watch.parks >= 1)
            assert watch._handle is None  # no probe timer on the loop
            assert watch._sleep_for() is None  # the thread waits with no deadline
            probes, seen = watch.lag_count, looks[0]
            # Thirty intervals: a probe that kept running would have run about thirty times.
            await asyncio.sleep(30 * INTERVAL)
            assert watch.lag_count == probes
            assert looks[0] <= seen + 1  # at most the look it had scheduled before parking
            assert watch.parks == 1
        finally:
            watch.stop()

    async def test_without_busy_the_probe_never_parks(self) -> None:
        # A LoopWatch not told how to see work watches for ever, as before.
        watch = LoopWatch(THRESHOLD, no_runs, interval=INTERVAL)
        watch.start(asyncio.get_running_loop())
        try:
            await until(lambda: watch.lag_count >= 5)
            assert watch.parks == 0
            assert watch._handle is not None
        finally:
            watch.stop()

    async def test_busy_keeps_it_armed(self) -> None:
        busy = [True]
        watch = idle_watch(busy)
        watch.start(asyncio.get_running_loop())
        try:
            await until(lambda: watch.lag_count >= 5)
            assert watch.parks == 0
            busy[0] = False
            await until(lambda: watch.parks == 1)
        finally:
            watch.stop()

    async def test_cpu_used_on_the_loop_keeps_it_armed(self) -> None:
        # Work taskd was not told of (a plugin's own task) shows as the loop thread's CPU.
        watch = idle_watch()
        watch.start(asyncio.get_running_loop())
        try:
            start = watch.lag_count
            while watch.lag_count < start + 5:
                spent = time.thread_time()
                while time.thread_time() - spent < IDLE_CPU * 2:
                    pass
                await asyncio.sleep(0)
            assert watch.parks == 0
        finally:
            watch.stop()


@pytest.mark.timeout(20)
class TestArmedAgain:
    async def test_a_block_after_a_poke_is_reported(self) -> None:
        await self.block_after_poke()

    def test_a_block_after_a_poke_is_reported_on_uvloop(self) -> None:
        uvloop.run(self.block_after_poke())

    async def block_after_poke(self) -> None:
        watch = idle_watch()
        with structlog.testing.capture_logs() as logs:
            watch.start(asyncio.get_running_loop())
            try:
                await until(lambda: watch.parks >= 1)
                watch.poke()
                assert watch._handle is not None
                hold(THRESHOLD * 5)
                await until(lambda: watch.parks >= 2)  # the probe ran, saw no work, parked
            finally:
                watch.stop()
        blocked = events(logs, "loop_blocked")
        assert len(blocked) == 1
        assert blocked[0]["blocked_for"] >= THRESHOLD
        assert len(events(logs, "loop_unblocked")) == 1
        assert watch.blocked_total == 1

    async def test_a_block_on_a_parked_loop_is_not_invented(self) -> None:
        # Nothing armed, so nothing is due: a report needs the probe to be overdue.
        watch = idle_watch()
        with structlog.testing.capture_logs() as logs:
            watch.start(asyncio.get_running_loop())
            try:
                await until(lambda: watch.parks >= 1)
                watch.threshold = THRESHOLD  # wakes the thread: it must find nothing due
                await asyncio.sleep(THRESHOLD * 3)
            finally:
                watch.stop()
        assert events(logs, "loop_blocked") == []

    async def test_beat_is_a_lag_sample_and_arms_the_probe(self) -> None:
        watch = idle_watch()
        watch.start(asyncio.get_running_loop())
        try:
            await until(lambda: watch.parks >= 1)
            count = watch.lag_count
            watch.beat(0.003)
            assert watch.lag_count == count + 1
            assert watch.lag == 0.003
            assert watch.lag_max >= 0.003
            assert watch._handle is not None
            assert watch.pokes == 1
            watch.beat(0.5)  # armed: the probe measures, the beat adds nothing
            assert watch.lag_count == count + 1
            assert watch.pokes == 1
            await until(lambda: watch.parks >= 2)
            watch.beat(-0.0005)  # a timer a hair early: no negative lag
            assert watch.lag == 0.0
            assert watch.pokes == 2
        finally:
            watch.stop()

    async def test_poke_when_armed_adds_no_timer(self) -> None:
        watch = idle_watch([True])
        watch.start(asyncio.get_running_loop())
        try:
            handle = watch._handle
            for _ in range(100):
                watch.poke()
            assert watch._handle is handle
            assert watch.pokes == 0
        finally:
            watch.stop()

    async def test_stop_wakes_a_parked_watchdog(self) -> None:
        watch = idle_watch()
        watch.start(asyncio.get_running_loop())
        await until(lambda: watch.parks >= 1)
        thread = watch._thread
        assert thread is not None
        watch.stop()
        assert not thread.is_alive()
