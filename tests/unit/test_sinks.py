"""The run-end sinks: one RunEnd per run, each sink on its own, in order."""

from __future__ import annotations

import time
from typing import Any

from structlog.testing import capture_logs

from taskd.ledger import NULL_LEDGER
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
    await execute(rt, make_spec(func, name="j"), info, NULL_LEDGER)
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


async def quiet(ctx: Any) -> None:
    return None


async def big(ctx: Any) -> str:
    return "x" * 400


async def run_with(rt: Runtime, func: Any, cause: Cause) -> RunInfo:
    now = time.time()
    info = RunInfo(rt.new_run_id(), "j", now - 0.25, now, cause)
    await execute(rt, make_spec(func, name="j"), info, NULL_LEDGER)
    await rt.settle()
    return info


class TestRunLine:
    """The one ``run`` line: its fields, in their order, for each kind of end."""

    @staticmethod
    async def line(rt: Runtime, func: Any, cause: Cause = Cause.SCHEDULE) -> dict[str, Any]:
        with capture_logs() as logs:
            info = await run_with(rt, func, cause)
        (line,) = [e for e in logs if e["event"] == "run"]
        assert line["run_id"] == info.run_id and line["late"] == 0.25
        return line

    async def test_a_scheduled_run_without_a_result(self, rt: Runtime) -> None:
        line = await self.line(rt, quiet)
        assert list(line) == [
            "job",
            "run_id",
            "attempt",
            "outcome",
            "duration",
            "late",
            "event",
            "log_level",
        ]
        assert (line["job"], line["attempt"], line["outcome"], line["log_level"]) == (
            "j",
            1,
            "succeeded",
            "info",
        )
        assert type(line["outcome"]) is str

    async def test_a_manual_run_with_a_small_result(self, rt: Runtime) -> None:
        line = await self.line(rt, answer, Cause.MANUAL)
        assert list(line)[6:8] == ["cause", "result"]
        assert line["cause"] == "manual" and type(line["cause"]) is str
        assert line["result"] == {"n": 42}

    async def test_a_result_too_long_for_the_line_is_left_out(self, rt: Runtime) -> None:
        line = await self.line(rt, big)
        assert "result" not in line and line["outcome"] == "succeeded"

    async def test_a_failed_catchup_run_says_its_cause_and_error(self, rt: Runtime) -> None:
        line = await self.line(rt, failing, Cause.CATCHUP)
        assert list(line)[6:8] == ["cause", "error"]
        assert line["cause"] == "catchup" and line["error"] == "ValueError: no"
        assert (line["outcome"], line["log_level"]) == ("failed", "error")
