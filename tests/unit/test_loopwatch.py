"""LoopWatch on real loops (asyncio and uvloop): a blocked loop is reported once, from the
watchdog thread, naming the task's job and run id and the blocking line; a healthy loop
logs nothing."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import structlog
import uvloop

from taskd.observe.loopwatch import LAG_BUCKETS, LoopWatch

THRESHOLD = 0.2


def block(seconds: float) -> None:
    """Plugin-like code that holds the loop."""
    time.sleep(seconds)


BLOCK_LINE = block.__code__.co_firstlineno + 2  # the time.sleep line


def no_runs(job: str) -> list[str]:
    return []


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def blocked_in_task(
    task_name: str, run_ids: Callable[[str], list[str]] = no_runs
) -> tuple[LoopWatch, list[dict[str, Any]]]:
    """Start a watch, block the loop for 0.6 s in a task named ``task_name``, let the loop turn
    again; the watch (stopped) and what it logged."""
    watch = LoopWatch(THRESHOLD, run_ids, interval=0.05)
    with structlog.testing.capture_logs() as logs:
        watch.start(asyncio.get_running_loop())
        try:
            await asyncio.sleep(0.2)  # a few probes first, as in a running daemon

            async def run() -> None:
                block(0.6)

            await asyncio.get_running_loop().create_task(run(), name=task_name)
            await asyncio.sleep(0.2)  # the probe runs again
        finally:
            watch.stop()
    return watch, list(logs)


def check_named_block(
    watch: LoopWatch, logs: list[dict[str, Any]], job: str, run: str | None
) -> None:
    (blocked,) = events(logs, "loop_blocked")
    assert blocked["log_level"] == "warning"
    assert (blocked["job"], blocked["run_id"]) == (job, run)
    assert blocked["frame"] == f"{__file__}:{BLOCK_LINE} in block"
    assert blocked["stack"][-1] == f"{__file__}:{BLOCK_LINE} block"
    assert len(blocked["stack"]) <= 5
    assert blocked["blocked_for"] >= THRESHOLD
    (unblocked,) = events(logs, "loop_unblocked")
    assert unblocked["log_level"] == "info"
    assert (unblocked["job"], unblocked["run_id"]) == (job, run)
    assert unblocked["blocked_for"] >= blocked["blocked_for"]
    assert logs.index(blocked) < logs.index(unblocked)
    assert watch.blocked_total == 1
    assert not watch.blocked
    assert watch.blocked_recently(5)
    assert watch.lag_max >= THRESHOLD


async def healthy(watch: LoopWatch) -> list[dict[str, Any]]:
    with structlog.testing.capture_logs() as logs:
        watch.start(asyncio.get_running_loop())
        try:
            for _ in range(20):  # a loop that keeps turning, with short callbacks, for 1 s
                await asyncio.sleep(0.05)
        finally:
            watch.stop()
    return list(logs)


def check_healthy(watch: LoopWatch, logs: list[dict[str, Any]]) -> None:
    assert logs == []
    assert watch.blocked_total == 0
    assert not watch.blocked_recently(60)
    assert watch.lag_count >= 5
    # Bounds far above a healthy loop's lag, only to catch a wrong measure (a probe that
    # counts its own interval as lag, say); how small the lag is belongs in bench/.
    assert watch.lag_max < THRESHOLD
    assert watch.lag_sum / watch.lag_count < THRESHOLD / 2


@pytest.mark.timeout(15)
class TestBlockedLoop:
    """A task that holds the loop is reported once, by job, run id and line."""

    async def test_run_task_is_named(self) -> None:
        watch, logs = await blocked_in_task("taskd-run:myjob:abc123")
        check_named_block(watch, logs, "myjob", "abc123")

    async def test_job_task_takes_its_run_ids(self) -> None:
        asked: list[str] = []

        def run_ids(job: str) -> list[str]:
            asked.append(job)
            return ["r1"]

        watch, logs = await blocked_in_task("taskd-job:x", run_ids)
        check_named_block(watch, logs, "x", "r1")
        assert asked == ["x"]

    async def test_failing_run_ids_still_name_the_job(self) -> None:
        def run_ids(job: str) -> list[str]:
            raise RuntimeError("dictionary changed size during iteration")

        watch, logs = await blocked_in_task("taskd-job:x", run_ids)
        check_named_block(watch, logs, "x", None)

    async def test_other_task_names_no_job(self) -> None:
        _watch, logs = await blocked_in_task("control-client")
        (blocked,) = events(logs, "loop_blocked")
        assert (blocked["job"], blocked["run_id"], blocked["task"]) == (
            None,
            None,
            "control-client",
        )
        assert blocked["frame"] == f"{__file__}:{BLOCK_LINE} in block"

    def test_uvloop(self) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert isinstance(runner.get_loop(), uvloop.Loop)
            watch, logs = runner.run(blocked_in_task("taskd-run:myjob:abc123"))
        check_named_block(watch, logs, "myjob", "abc123")

    async def test_a_plain_callback_is_named_by_its_line(self) -> None:
        watch = LoopWatch(THRESHOLD, no_runs, interval=0.05)
        loop = asyncio.get_running_loop()
        with structlog.testing.capture_logs() as logs:
            watch.start(loop)
            try:
                await asyncio.sleep(0.1)
                loop.call_soon(block, 0.5)
                await asyncio.sleep(0.3)
            finally:
                watch.stop()
        (blocked,) = events(logs, "loop_blocked")
        assert (blocked["job"], blocked["task"]) == (None, None)
        assert blocked["frame"] == f"{__file__}:{BLOCK_LINE} in block"

    async def test_two_blocks_two_episodes(self) -> None:
        watch = LoopWatch(THRESHOLD, no_runs, interval=0.05)
        with structlog.testing.capture_logs() as logs:
            watch.start(asyncio.get_running_loop())
            try:
                for _ in range(2):
                    await asyncio.sleep(0.15)
                    block(0.4)
                await asyncio.sleep(0.15)
            finally:
                watch.stop()
        assert len(events(logs, "loop_blocked")) == 2
        assert len(events(logs, "loop_unblocked")) == 2
        assert watch.blocked_total == 2


@pytest.mark.timeout(15)
class TestHealthyLoop:
    """A loop that keeps turning logs nothing and shows a small lag."""

    async def test_asyncio(self) -> None:
        watch = LoopWatch(THRESHOLD, no_runs, interval=0.05)
        check_healthy(watch, await healthy(watch))

    def test_uvloop(self) -> None:
        watch = LoopWatch(THRESHOLD, no_runs, interval=0.05)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            logs = runner.run(healthy(watch))
        check_healthy(watch, logs)

    async def test_threshold_below_the_interval_is_not_a_block(self) -> None:
        # Blocked means the probe is overdue, not that its interval is longer than the threshold.
        watch = LoopWatch(0.02, no_runs, interval=0.1)
        logs = await healthy(watch)
        assert events(logs, "loop_blocked") == []

    async def test_the_watchdog_wakes_once_a_probe_not_at_a_quarter_threshold(self) -> None:
        # An idle daemon's CPU was mostly this thread polling 16 times a second.
        watch = LoopWatch(0.2, no_runs, interval=0.25)
        checks = 0
        real_check = watch._check

        def counted() -> None:
            nonlocal checks
            checks += 1
            real_check()

        watch._check = counted  # type: ignore[method-assign]
        with structlog.testing.capture_logs() as logs:
            watch.start(asyncio.get_running_loop())
            try:
                await asyncio.sleep(1.5)
            finally:
                watch.stop()
        assert events(logs, "loop_blocked") == []
        assert watch.lag_count >= 1
        # A poll at a quarter of the threshold would have checked 30 times by now.
        assert checks <= 2 * watch.lag_count + 2, (checks, watch.lag_count)


@pytest.mark.timeout(15)
class TestLagFigures:
    """The histogram and the rolling maximum the metrics read."""

    async def test_histogram_counts_every_probe(self) -> None:
        watch = LoopWatch(10.0, no_runs, interval=0.02)
        with structlog.testing.capture_logs():
            watch.start(asyncio.get_running_loop())
            try:
                await asyncio.sleep(0.1)
                block(0.06)  # below the threshold: lag, not a reported block
                await asyncio.sleep(0.1)
            finally:
                watch.stop()
        assert watch.lag_buckets == LAG_BUCKETS
        assert len(watch.lag_counts) == len(LAG_BUCKETS) + 1
        assert sum(watch.lag_counts) == watch.lag_count >= 3
        assert watch.lag_sum >= 0.03
        assert watch.lag_max >= 0.03
        assert watch.blocked_total == 0
        cumulative = watch.lag_histogram()
        assert [b for b, _ in cumulative] == [*LAG_BUCKETS, math.inf]
        counts = [c for _, c in cumulative]
        assert counts == sorted(counts)
        assert counts[-1] == watch.lag_count
        # The blocked probe's lag (about 50 ms) is above 25 ms.
        assert counts[LAG_BUCKETS.index(0.025)] < watch.lag_count

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="more than 0"):
            LoopWatch(0, no_runs)
        with pytest.raises(ValueError, match="more than 0"):
            LoopWatch(0.25, no_runs, interval=0)


@pytest.mark.timeout(15)
class TestStop:
    """stop() ends the probe and the thread at once, and may be called again."""

    async def test_stop_joins_quickly_and_twice(self) -> None:
        watch = LoopWatch(40.0, no_runs)  # the watchdog sleeps 10 s between looks
        watch.start(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        (thread,) = [t for t in threading.enumerate() if t.name == "taskd-loopwatch"]
        began = time.monotonic()
        watch.stop()
        assert time.monotonic() - began < 1.0
        assert not thread.is_alive()
        count = watch.lag_count
        await asyncio.sleep(0.25)
        assert watch.lag_count == count  # the probe is not re-armed
        watch.stop()

    async def test_start_twice_is_refused(self) -> None:
        watch = LoopWatch(1.0, no_runs)
        watch.start(asyncio.get_running_loop())
        try:
            with pytest.raises(RuntimeError, match="already started"):
                watch.start(asyncio.get_running_loop())
        finally:
            watch.stop()

    def test_stopped_loop_is_not_blocked(self) -> None:
        # A loop that stopped without stop() (a crash on the way out) is not a blocked loop.
        loop = asyncio.new_event_loop()
        watch = LoopWatch(0.05, no_runs, interval=0.02)
        try:
            with structlog.testing.capture_logs() as logs:
                watch.start(loop)
                loop.run_until_complete(asyncio.sleep(0.05))
                time.sleep(0.3)  # the loop is not running meanwhile
            assert events(logs, "loop_blocked") == []
        finally:
            watch.stop()
            loop.close()


class TestReviewRegressions:
    """Cases an independent review found, each pinned."""

    async def test_plugin_frame_named_over_a_library_below_it(self) -> None:
        """A plugin blocked inside a library it calls (psutil here) is named by its own line."""
        import psutil

        def plugin_code() -> None:
            psutil.cpu_percent(interval=0.6)  # a library call that blocks

        line = plugin_code.__code__.co_firstlineno + 1
        watch = LoopWatch(THRESHOLD, no_runs, interval=0.05)
        watch.is_plugin_file = lambda filename: filename == __file__
        with structlog.testing.capture_logs() as logs:
            watch.start(asyncio.get_running_loop())
            try:
                await asyncio.sleep(0.2)

                async def run() -> None:
                    plugin_code()

                await asyncio.get_running_loop().create_task(run(), name="taskd-run:lib:r1")
                await asyncio.sleep(0.2)
            finally:
                watch.stop()
        (blocked,) = events(logs, "loop_blocked")
        assert blocked["frame"] == f"{__file__}:{line} in {plugin_code.__qualname__}", blocked
        assert (blocked["job"], blocked["run_id"]) == ("lib", "r1")

    async def test_no_plugin_code_blames_no_job(self) -> None:
        """Lag with no plugin frame on the loop (taskd itself, or the GIL held by threads) is
        reported without naming the task that happened to be current."""
        watch = LoopWatch(THRESHOLD, no_runs, interval=0.05)
        watch.is_plugin_file = lambda filename: False  # nothing here is a plugin's
        with structlog.testing.capture_logs() as logs:
            watch.start(asyncio.get_running_loop())
            try:
                await asyncio.sleep(0.2)

                async def run() -> None:
                    block(0.6)

                await asyncio.get_running_loop().create_task(run(), name="taskd-run:innocent:r2")
                await asyncio.sleep(0.2)
            finally:
                watch.stop()
        (blocked,) = events(logs, "loop_blocked")
        assert (blocked["job"], blocked["run_id"]) == (None, None), blocked
        assert "GIL" in blocked["note"]

    async def test_lowered_threshold_applies_within_a_quarter_second(self) -> None:
        watch = LoopWatch(60.0, no_runs, interval=0.05)
        with structlog.testing.capture_logs() as logs:
            watch.start(asyncio.get_running_loop())
            try:
                await asyncio.sleep(0.3)  # the watchdog is now in a long wait
                watch.threshold = THRESHOLD  # a reload lowered it
                block(1.0)
                await asyncio.sleep(0.2)
            finally:
                watch.stop()
        assert len(events(logs, "loop_blocked")) == 1
