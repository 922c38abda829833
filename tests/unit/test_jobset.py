"""JobSet in-process: one apply for start and reload, manual triggers under each overlap
policy, pause and resume with catch-up."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from taskd.jobspec import JobSpec
from taskd.run.events import Cause, Outcome, SkipReason
from taskd.run.runner import RunInfo
from taskd.run.runtime import Runtime
from taskd.schedule.jobset import JobSet, NoSuchJob
from taskd.schedule.manual import ManualRun
from taskd.state.store import JobRow
from tests.unit.test_scheduler import make_spec, runs, skips, stop, wait_until


@pytest.fixture
def logs():
    with capture_logs() as captured:
        yield captured


async def quick(ctx: Any) -> str:
    return "ok"


def slow(seconds: float) -> Any:
    async def job(ctx: Any) -> str:
        await asyncio.sleep(seconds)
        return "slow"

    return job


async def close(jobs: JobSet, rt: Runtime) -> None:
    for job in jobs.everyone():
        await stop(job, rt)


class TestApply:
    """Start and reload are the same apply: stored cursor, pause and broken reporting."""

    async def test_start_uses_stored_cursor_and_pause(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        spec = make_spec(quick, name="a", every=3600.0)
        cursor = time.time() - 3 * 3600  # three hourly ticks missed while down
        diff = jobs.apply({"a": spec}, {"a": JobRow("a", last_tick=cursor, paused=True)})
        assert diff.added == ("a",)
        assert jobs.jobs["a"].paused
        assert jobs.jobs["a"].cursor == cursor
        await close(jobs, rt)

    async def test_removed_and_added_back_keeps_its_cursor(self, rt: Runtime, logs) -> None:
        """Added back by a reload, a job catches up as it would after a restart."""
        jobs = JobSet(rt)
        spec = make_spec(quick, name="a", every=3600.0, catchup="latest")
        jobs.apply({"a": spec}, {})
        await asyncio.sleep(0.05)
        assert jobs.apply({}, {}).removed == ("a",)
        stored = {"a": JobRow("a", last_tick=time.time() - 2 * 3600 - 5)}
        diff = jobs.apply({"a": spec}, stored)
        assert diff.added == ("a",)
        await wait_until(lambda: bool(runs(logs, job="a")))
        assert runs(logs, job="a")[0]["outcome"] == "succeeded"
        await close(jobs, rt)

    async def test_broken_job_reported_on_start_and_reload(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        ok = make_spec(quick, name="a")
        broken = JobSpec(ok.config, None, ok.trigger, broken="plugin x failed")
        assert jobs.apply({"a": broken}, {}).broken == ("a",)
        assert jobs.apply({"a": ok}, {}).changed == ("a",)
        assert jobs.apply({"a": broken}, {}).broken == ("a",)
        assert [e["job"] for e in logs if e["event"] == "job_broken"] == ["a", "a"]
        await close(jobs, rt)

    async def test_same_count_other_names_removes_and_adds(self, rt: Runtime) -> None:
        """A rename keeps the number of jobs: the old name still goes, the new one comes."""
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(quick, name="a"), "b": make_spec(quick, name="b")}, {})
        old_b = jobs.jobs["b"]
        diff = jobs.apply({"b": make_spec(quick, name="b"), "c": make_spec(quick, name="c")}, {})
        assert (diff.added, diff.changed, diff.removed) == (("c",), (), ("a",))
        assert sorted(jobs.jobs) == ["b", "c"]
        assert jobs.jobs["b"] is old_b  # unchanged: the same scheduled job goes on
        await close(jobs, rt)

    async def test_disabled_jobs_are_left_out(self, rt: Runtime) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(quick, name="a", enabled=False)}, {})
        assert jobs.jobs == {}
        with pytest.raises(NoSuchJob):
            jobs.get("a")


class TestTrigger:
    """A manual run goes through the runner, under the job's overlap policy."""

    async def test_idle_job_runs_now_with_cause_manual(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(quick, name="a", every=3600.0)}, {})
        await asyncio.sleep(0.02)
        cursor = jobs.jobs["a"].cursor
        manual = ManualRun()
        assert jobs.trigger("a", manual) is None
        info = await asyncio.wait_for(manual.ended, 2)
        assert isinstance(info, RunInfo)
        assert info.outcome is Outcome.SUCCEEDED and info.result == "ok"
        assert info.cause is Cause.MANUAL
        await rt.settle()
        assert runs(logs, job="a")[0]["cause"] == "manual"
        assert jobs.jobs["a"].cursor == cursor  # no tick used up
        await close(jobs, rt)

    @pytest.mark.parametrize(
        ("overlap", "expect"),
        [("skip", SkipReason.OVERLAP), ("queue", None), ("replace", None), ("allow", None)],
    )
    async def test_busy_job_follows_overlap(
        self, rt: Runtime, logs, overlap: str, expect: SkipReason | None
    ) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(slow(0.4), name="a", every=3600.0, overlap=overlap)}, {})
        await asyncio.sleep(0.02)
        first = ManualRun()
        assert jobs.trigger("a", first) is None
        await asyncio.wait_for(first.started, 2)
        second = ManualRun()
        assert jobs.trigger("a", second) == expect
        ended_first = await asyncio.wait_for(first.ended, 3)
        ended_second = await asyncio.wait_for(second.ended, 3)
        assert isinstance(ended_first, RunInfo)
        if overlap == "skip":
            assert ended_second is SkipReason.OVERLAP
            assert ended_first.outcome is Outcome.SUCCEEDED
        elif overlap == "queue":
            assert isinstance(ended_second, RunInfo)
            assert ended_second.started >= ended_first.ended  # one after the other
        elif overlap == "replace":
            assert ended_first.outcome is Outcome.CANCELLED
            assert isinstance(ended_second, RunInfo)
            assert ended_second.outcome is Outcome.SUCCEEDED
        else:
            assert isinstance(ended_second, RunInfo)
            assert ended_second.started < ended_first.ended  # side by side
        await close(jobs, rt)

    async def test_trigger_runs_a_paused_job(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(quick, name="a", every=3600.0)}, {})
        jobs.set_paused("a", True)
        manual = ManualRun()
        assert jobs.trigger("a", manual) is None
        info = await asyncio.wait_for(manual.ended, 2)
        assert isinstance(info, RunInfo) and info.outcome is Outcome.SUCCEEDED
        await close(jobs, rt)

    async def test_broken_job_is_refused(self, rt: Runtime) -> None:
        jobs = JobSet(rt)
        ok = make_spec(quick, name="a")
        jobs.apply({"a": JobSpec(ok.config, None, ok.trigger, broken="gone")}, {})
        manual = ManualRun()
        assert jobs.trigger("a", manual) is SkipReason.BROKEN
        assert manual.ended.result() is SkipReason.BROKEN
        await close(jobs, rt)

    async def test_queued_manual_run_dropped_at_stop_tells_its_waiter(self, rt: Runtime) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(slow(0.5), name="a", every=3600.0, overlap="queue")}, {})
        await asyncio.sleep(0.02)
        first, second = ManualRun(), ManualRun()
        jobs.trigger("a", first)
        await asyncio.wait_for(first.started, 2)
        jobs.trigger("a", second)
        jobs.stop()
        assert await asyncio.wait_for(second.ended, 1) is SkipReason.SHUTDOWN
        await close(jobs, rt)


class TestPause:
    """While paused no tick is handled; on resume catchup decides, as after downtime."""

    async def test_paused_ticks_then_catchup_latest(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(quick, name="a", every=0.1, catchup="latest")}, {})
        await wait_until(lambda: bool(runs(logs, job="a")))
        assert jobs.set_paused("a", True)
        assert not jobs.set_paused("a", True)  # already paused
        await rt.settle()
        before = len(runs(logs, job="a"))
        await asyncio.sleep(0.55)
        await rt.settle()
        assert len(runs(logs, job="a")) == before  # nothing ran while paused
        assert jobs.status()[0]["state"] == "paused" and jobs.status()[0]["next"] is None
        jobs.set_paused("a", False)
        await wait_until(lambda: len(runs(logs, job="a")) > before)
        await rt.settle()
        paused = skips(logs, "paused")
        assert paused, "the ticks that came while paused are counted as skipped: paused"
        assert sum(e["count"] for e in paused) >= 3
        assert rt.stats.skips[("a", "paused")] >= 3
        assert not skips(logs, "coalesced") and not skips(logs, "missed")
        await close(jobs, rt)

    async def test_resume_with_catchup_all_runs_the_backlog(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(quick, name="a", every=0.1, catchup="all", grace=0.05)}, {})
        await wait_until(lambda: bool(runs(logs, job="a")))
        jobs.set_paused("a", True)
        await rt.settle()
        before = len(runs(logs, job="a"))
        await asyncio.sleep(0.5)
        jobs.set_paused("a", False)
        await wait_until(lambda: len(runs(logs, job="a")) >= before + 4)
        await rt.settle()
        caught_up = [e for e in runs(logs, job="a")[before:] if e.get("cause") == "catchup"]
        assert len(caught_up) >= 3
        await close(jobs, rt)

    async def test_status_rows(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(slow(0.3), name="a", every=3600.0)}, {})
        await asyncio.sleep(0.02)
        row = jobs.status()[0]
        assert row["state"] == "idle" and row["next"] > time.time()
        manual = ManualRun()
        jobs.trigger("a", manual)
        await asyncio.wait_for(manual.started, 2)
        row = jobs.status()[0]
        assert row["state"] == "running"
        assert row["running"][0]["cause"] == "manual"
        await asyncio.wait_for(manual.ended, 2)
        await rt.settle()
        row = jobs.status()[0]
        assert row["last"]["outcome"] == "succeeded" and row["failures"] == 0
        await close(jobs, rt)

    async def test_pause_drops_ticks_queued_behind_a_run(self, rt: Runtime, logs) -> None:
        """Queued scheduled ticks do not run once paused (skipped: paused); a queued manual
        run still does."""
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(slow(0.4), name="a", every=0.1, overlap="queue")}, {})
        job = jobs.jobs["a"]
        await wait_until(lambda: len(job.queue) >= 2)
        manual = ManualRun()
        jobs.trigger("a", manual)
        queued_ticks = len(job.queue) - 1
        jobs.set_paused("a", True)
        assert [cause for _, cause, _ in job.queue] == [Cause.MANUAL]
        assert sum(e["count"] for e in skips(logs, "paused")) == queued_ticks
        info = await asyncio.wait_for(manual.ended, 3)
        assert isinstance(info, RunInfo) and info.outcome is Outcome.SUCCEEDED
        await rt.settle()
        ran = len(runs(logs, job="a"))
        await asyncio.sleep(0.5)
        await rt.settle()
        assert len(runs(logs, job="a")) == ran  # nothing more while paused
        await close(jobs, rt)


class TestReviewRegressions:
    """Cases an independent review found, each pinned."""

    async def test_replace_twice_in_one_iteration_records_both(self, rt: Runtime, logs) -> None:
        """A run cancelled by overlap = "replace" before its first step is still a run: it
        ends cancelled, with its log line (it used to vanish)."""
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(slow(0.2), name="a", every=3600.0, overlap="replace")}, {})
        await asyncio.sleep(0.02)
        first, second = ManualRun(), ManualRun()
        assert jobs.trigger("a", first) is None
        assert jobs.trigger("a", second) is None  # same iteration: the first never started
        one = await asyncio.wait_for(first.ended, 2)
        two = await asyncio.wait_for(second.ended, 2)
        assert isinstance(one, RunInfo) and one.outcome is Outcome.CANCELLED
        assert one.error == "replaced by a newer run"
        assert isinstance(two, RunInfo) and two.outcome is Outcome.SUCCEEDED
        await rt.settle()
        outcomes = {e["run_id"]: e["outcome"] for e in runs(logs, job="a")}
        assert outcomes == {one.run_id: "cancelled", two.run_id: "succeeded"}
        await close(jobs, rt)

    async def test_trigger_of_a_crashed_scheduler_is_refused(self, rt: Runtime, logs) -> None:
        """A job whose scheduling task died cannot run inline runs: refuse, don't hang."""

        class Exploding:
            def next_after(self, t: float) -> float:
                raise RuntimeError("bug in a trigger")

        spec = make_spec(quick, name="a", every=3600.0)
        spec = JobSpec(spec.config, spec.jobtype, Exploding())  # type: ignore[arg-type]
        jobs = JobSet(rt)
        jobs.apply({"a": spec}, {})
        await wait_until(lambda: jobs.jobs["a"].crashed)
        manual = ManualRun()
        assert jobs.trigger("a", manual) is SkipReason.CRASHED
        assert manual.ended.result() is SkipReason.CRASHED
        assert jobs.status()[0]["state"] == "crashed"
        assert [e for e in logs if e["event"] == "scheduler_crashed"]

    async def test_added_back_while_running_catches_up(self, rt: Runtime, logs) -> None:
        """Removed during its run and added back: the ticks meanwhile are handled by catchup
        (here: skipped, counted), not dropped silently."""
        jobs = JobSet(rt)
        spec = make_spec(slow(0.6), name="a", every=0.1, catchup="latest")
        jobs.apply({"a": spec}, {})
        await wait_until(lambda: bool(jobs.jobs["a"].active))
        jobs.apply({}, {})
        await asyncio.sleep(0.35)
        jobs.apply({"a": spec}, {})
        await asyncio.sleep(0.6)
        await rt.settle()
        # Every skip is counted at once (the log adds them up per span, see skips.py).
        handled = sum(rt.stats.skips[k] for k in rt.stats.skips if k[0] == "a") + len(
            runs(logs, job="a")
        )
        assert handled >= 8, logs  # ~1.1 s of 100 ms ticks, every one run or skipped
        await close(jobs, rt)
        logged = sum(e["count"] for e in logs if e["event"] == "skipped")
        assert logged == sum(rt.stats.skips[k] for k in rt.stats.skips if k[0] == "a")

    async def test_schedule_change_while_paused_keeps_the_backlog(self, rt: Runtime, logs) -> None:
        """Paused, then a reload changes the schedule: on resume the backlog is decided (as
        after a restart with the new config), not dropped without a word."""
        jobs = JobSet(rt)
        spec = make_spec(quick, name="a", every=0.1, catchup="latest")
        jobs.apply({"a": spec}, {})
        await wait_until(lambda: bool(runs(logs, job="a")))
        jobs.set_paused("a", True)
        await asyncio.sleep(0.5)
        changed = make_spec(quick, name="a", every=0.05, catchup="latest")
        assert jobs.apply({"a": changed}, {}).changed == ("a",)
        jobs.set_paused("a", False)
        await asyncio.sleep(0.05)
        await rt.settle()
        assert sum(e["count"] for e in skips(logs, "paused")) >= 5
        await close(jobs, rt)


class TestCompareAhead:
    """A reload judges unchanged jobs ahead, in steps (JobSet.compare); apply, still one
    piece, takes those verdicts, and only for the very specs they were made on."""

    async def test_apply_takes_the_verdicts(
        self, rt: Runtime, logs, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        jobs = JobSet(rt)
        jobs.apply({n: make_spec(quick, name=n, every=3600.0) for n in ("a", "b")}, {})
        new = {
            "a": make_spec(quick, name="a", every=3600.0),  # equal, a fresh object
            "b": make_spec(quick, name="b", every=60.0),
        }
        steps = jobs.compare(new)
        assert list(steps) == []  # two jobs: one step, no yield
        calls: list[str] = []
        same_as = JobSpec.same_as

        def counted(self: JobSpec, other: JobSpec) -> bool:
            calls.append(self.name)
            return same_as(self, other)

        monkeypatch.setattr(JobSpec, "same_as", counted)
        diff = jobs.apply(new, {})
        assert (diff.added, diff.changed, diff.removed) == ((), ("b",), ())
        assert calls == []  # every verdict came from compare
        assert jobs.jobs["a"].spec is new["a"]
        await close(jobs, rt)

    async def test_verdict_on_other_specs_is_not_used(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        jobs.apply({"a": make_spec(quick, name="a", every=3600.0)}, {})
        list(jobs.compare({"a": make_spec(quick, name="a", every=3600.0)}))  # "same"
        changed = {"a": make_spec(quick, name="a", every=60.0)}
        assert jobs.apply(changed, {}).changed == ("a",)  # judged again: a new spec
        list(jobs.compare(changed))  # "same": the job has that very spec now
        # The job's spec was replaced after that compare ran (say, by another apply).
        jobs.jobs["a"].spec = make_spec(quick, name="a", every=30.0)
        assert jobs.apply(changed, {}).changed == ("a",)
        await close(jobs, rt)

    async def test_many_jobs_compare_in_steps(self, rt: Runtime, logs) -> None:
        jobs = JobSet(rt)
        specs = {f"j{i}": make_spec(quick, name=f"j{i}", every=3600.0) for i in range(200)}
        jobs.apply(specs, {})
        steps = len(list(jobs.compare(dict(specs))))
        assert steps == 200 // 64  # it yields to the loop between groups of jobs
        assert jobs.apply(dict(specs), {}).changed == ()
        await close(jobs, rt)
