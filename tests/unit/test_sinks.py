"""The run-end sinks: one RunEnd per run, each sink on its own, in order."""

from __future__ import annotations

import time
from typing import Any

from structlog.testing import capture_logs

from taskd.run.events import Cause, Outcome
from taskd.run.runner import RunInfo, execute
from taskd.run.runtime import Runtime
from taskd.run.sinks import RunEnd
from tests.unit.test_scheduler import make_spec


class Recorder:
    def __init__(self) -> None:
        self.ends: list[RunEnd] = []

    def run_ended(self, end: RunEnd) -> None:
        self.ends.append(end)


class Raiser:
    def run_ended(self, end: RunEnd) -> None:
        raise RuntimeError("sink bug")


async def failing(ctx: Any) -> None:
    raise ValueError("no")


async def answer(ctx: Any) -> dict[str, int]:
    return {"n": 42}


async def run_once(rt: Runtime, func: Any) -> RunInfo:
    now = time.time()
    info = RunInfo(rt.new_run_id(), "j", now, now, Cause.MANUAL)
    await execute(rt, make_spec(func, name="j"), info)
    await rt.settle()
    return info


class TestSinks:
    """Every sink sees the same RunEnd; one that raises costs only itself."""

    async def test_a_raising_sink_does_not_stop_the_rest(self, rt: Runtime) -> None:
        recorder = Recorder()
        rt.sinks[1:1] = [Raiser()]
        rt.sinks.append(recorder)
        with capture_logs() as logs:
            await run_once(rt, answer)
        assert [e["event"] for e in logs if e["event"] in ("sink_failed", "run")] == [
            "sink_failed",
            "run",
        ]
        end = recorder.ends[0]
        assert end.outcome is Outcome.SUCCEEDED and end.result == {"n": 42}
        assert end.result_json == '{"n": 42}'
        assert rt.shared.get("j") == {"n": 42}  # the shared-state sink ran after the raiser

    async def test_forget_drops_a_removed_jobs_counters(self, rt: Runtime) -> None:
        with capture_logs():
            await run_once(rt, failing)
        rt.stats.skips[("j", "overlap")] += 1
        rt.stats.forget(["j"])
        stats = rt.stats
        assert not (stats.last or stats.failures or stats.outcomes or stats.skips)

    async def test_stats_run_first_and_set_the_streak(self, rt: Runtime) -> None:
        recorder = Recorder()
        rt.sinks.append(recorder)
        with capture_logs():
            await run_once(rt, failing)
            await run_once(rt, failing)
        assert [e.failures for e in recorder.ends] == [1, 2]
        assert rt.stats.last["j"].outcome is Outcome.FAILED
