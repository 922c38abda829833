"""Scheduling as a real daemon does it: anchored ticks, cron, at, startup, overlap policies,
retries, timeouts, jitter, broken and disabled jobs, catch-up after downtime, shared state."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProc, poll

SCHED = """
import asyncio
import json
import time

import taskd


async def nap(ctx, seconds: float = 0.0, fail_until: int = 0, record: str = "") -> dict:
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"run": ctx.run_id, "attempt": ctx.attempt, "t": time.time()}) + "\\n")
    if ctx.attempt <= fail_until:
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    if seconds:
        await asyncio.sleep(seconds)
    return {"scheduled": ctx.scheduled.timestamp()}


def block(seconds: float = 0.0, answer: int = 0) -> dict:
    time.sleep(seconds)
    return {"answer": answer}


async def count(ctx, key: str = "counter") -> int:
    async with ctx.state.locked() as data:
        value = data.get(key, 0)
        await asyncio.sleep(0)  # a read-modify-write across an await, as the lock is for
        data[key] = value + 1
    return value + 1


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("nap", nap),
        taskd.JobType("block", block, kind="blocking"),
        taskd.JobType("count", count),
    ]
"""

PLUGINS = {"sched.py": SCHED}
EPS = 1e-6


def on_grid(t: float, step: float) -> bool:
    return abs(t / step - round(t / step)) < EPS / step


def ends(row: dict[str, Any]) -> float:
    return float(row["started"]) + float(row["duration"])


def last_tick(d: DaemonProc, job: str) -> float:
    with d.db() as db:
        row = db.execute("SELECT last_tick FROM jobs WHERE name = ?", (job,)).fetchone()
    assert row is not None and row[0] is not None
    return float(row[0])


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def started_at(d: DaemonProc) -> float:
    """When the daemon logged "started" (epoch seconds)."""
    return datetime.fromisoformat(d.events("started")[0]["timestamp"]).timestamp()


class TestEvery:
    """`every` is anchored to the epoch and never starts a run before its tick."""

    @pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
    def test_anchored_without_drift_and_never_early(self, daemon_factory, loop: str) -> None:
        env = {"TASKD_LOOP": "asyncio"} if loop == "asyncio" else {}
        d = daemon_factory('[jobs.tick]\ntype = "nap"\nevery = "100ms"\n', PLUGINS, env=env).start()
        assert d.events("started")[0]["loop"] == loop
        d.wait_for("run", job="tick", count=10, timeout=5)
        assert d.stop() == 0
        lines = d.events("run", job="tick")
        assert all(r["outcome"] == "succeeded" and r["late"] >= 0 for r in lines), lines
        rows = d.history("tick")
        ticks = [r["scheduled"] for r in rows]
        assert all(on_grid(t, 0.1) for t in ticks), ticks
        assert all(abs((b - a) - 0.1) < EPS for a, b in itertools.pairwise(ticks)), ticks
        assert all(r["started"] >= r["scheduled"] for r in rows), rows


class TestOtherTriggers:
    """cron with seconds, a one-shot `at`, and `on = "startup"`."""

    def test_cron_with_seconds_field_runs_each_second(self, daemon_factory) -> None:
        d = daemon_factory('[jobs.sec]\ntype = "nap"\ncron = "*/1 * * * * *"\n', PLUGINS).start()
        runs = d.wait_for("run", job="sec", outcome="succeeded", count=2, timeout=4)
        assert all(r["late"] >= 0 for r in runs)
        ticks = [r["scheduled"] for r in d.history("sec")]
        assert all(on_grid(t, 1.0) for t in ticks), ticks
        assert len(set(ticks)) == len(ticks)

    def test_at_runs_once_at_its_time(self, daemon_factory) -> None:
        when = math.ceil(time.time() * 10) / 10 + 1.5
        d = daemon_factory(f'[jobs.once]\ntype = "nap"\nat = "{iso(when)}"\n', PLUGINS).start()
        run = d.wait_for("run", job="once", timeout=5)[0]
        assert run["outcome"] == "succeeded" and run["late"] >= 0
        time.sleep(0.6)  # long enough for a wrong second run of a 200ms-scale loop to show
        assert len(d.events("run", job="once")) == 1
        rows = d.history("once")
        assert len(rows) == 1
        assert abs(rows[0]["scheduled"] - when) < 1e-3
        assert rows[0]["started"] >= when

    def test_on_startup_runs_once(self, daemon_factory) -> None:
        d = daemon_factory('[jobs.boot]\ntype = "nap"\non = "startup"\n', PLUGINS).start()
        d.wait_for("run", job="boot", outcome="succeeded", timeout=3)
        time.sleep(0.6)
        assert len(d.events("run", job="boot")) == 1
        assert d.stop() == 0
        assert len(d.history("boot")) == 1


class TestOverlap:
    """A job slower than its interval under each overlap policy."""

    def test_skip_never_runs_two_at_once(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.slow]
            type = "nap"
            every = "200ms"
            overlap = "skip"
            [jobs.slow.options]
            seconds = 0.5
            """,
            PLUGINS,
        ).start()
        d.wait_for("run", job="slow", outcome="succeeded", count=2, timeout=5)
        first = d.wait_for("skipped", job="slow", reason="overlap", timeout=3)[0]
        assert first["count"] == 1  # the first skip, at once
        assert d.stop() == 0
        # The ones after it, added up in one line (here at the stop): 2 per 0.5 s run.
        skips = d.events("skipped", job="slow", reason="overlap")
        assert len(skips) == 2 and skips[1]["count"] >= 2, skips
        rows = sorted(d.history("slow"), key=lambda r: r["started"])
        for a, b in itertools.pairwise(rows):
            assert b["started"] >= ends(a), (a, b)

    def test_queue_runs_ticks_one_after_another(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.q]
            type = "nap"
            every = "200ms"
            overlap = "queue"
            [jobs.q.options]
            seconds = 0.3
            """,
            PLUGINS,
        ).start()
        d.wait_for("run", job="q", outcome="succeeded", count=5, timeout=5)
        assert d.events("skipped", job="q") == []
        assert d.stop() == 0
        # At the stop the queued ticks are dropped, each counted as a skip for "shutdown".
        assert {s["reason"] for s in d.events("skipped", job="q")} <= {"shutdown"}
        rows = sorted(d.history("q"), key=lambda r: r["started"])
        ticks = [r["scheduled"] for r in rows]
        assert all(abs((b - a) - 0.2) < EPS for a, b in itertools.pairwise(ticks)), ticks
        for a, b in itertools.pairwise(rows):
            assert b["started"] >= ends(a) - 1e-3, (a, b)
        # The queue fell behind: later runs start well after their tick, none was dropped.
        assert rows[-1]["started"] - rows[-1]["scheduled"] > 0.2

    def test_replace_cancels_the_running_run(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.r]
            type = "nap"
            every = "300ms"
            overlap = "replace"
            [jobs.r.options]
            seconds = 1.0
            """,
            PLUGINS,
        ).start()
        cancelled = d.wait_for("run", job="r", outcome="cancelled", count=2, timeout=5)
        assert all("replaced" in c["error"] for c in cancelled)
        rows = {r["run_id"]: r for r in d.history("r")}
        first = rows[cancelled[0]["run_id"]]
        follower = next(
            r for r in rows.values() if abs(r["scheduled"] - first["scheduled"] - 0.3) < EPS
        )
        assert first["outcome"] == "cancelled"
        # The newer run starts as the old one is cancelled, not after a tick of waiting.
        assert abs(ends(first) - follower["started"]) < 0.1

    def test_allow_runs_overlap(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.a]
            type = "nap"
            every = "200ms"
            overlap = "allow"
            [jobs.a.options]
            seconds = 0.5
            """,
            PLUGINS,
        ).start()
        d.wait_for("run", job="a", outcome="succeeded", count=3, timeout=5)
        assert d.events("skipped", job="a") == []
        rows = sorted(
            (r for r in d.history("a") if r["outcome"] == "succeeded"),
            key=lambda r: r["started"],
        )
        overlapping = [(a, b) for a, b in itertools.pairwise(rows) if b["started"] < ends(a)]
        assert overlapping, rows


class TestRetriesAndTimeouts:
    """Retries back off exponentially; a timeout stops the run, or marks its thread stuck."""

    def test_retries_with_exponential_backoff(self, daemon_factory, tmp_path: Path) -> None:
        record = tmp_path / "attempts.jsonl"
        d = daemon_factory(
            f"""
            [jobs.flaky]
            type = "nap"
            on = "startup"
            retries = 2
            retry_backoff = "100ms"
            [jobs.flaky.options]
            fail_until = 2
            record = "{record}"
            """,
            PLUGINS,
        ).start()
        run = d.wait_for("run", job="flaky", timeout=5)[0]
        assert run["outcome"] == "succeeded" and run["attempt"] == 3
        retrying = d.events("run_retrying", job="flaky")
        assert [r["attempt"] for r in retrying] == [1, 2]
        assert [r["retry_in"] for r in retrying] == [0.1, 0.2]
        assert all("fails on purpose" in r["error"] for r in retrying)
        attempts = [json.loads(line) for line in record.read_text().splitlines()]
        assert [a["attempt"] for a in attempts] == [1, 2, 3]
        assert len({a["run"] for a in attempts}) == 1
        gap1 = attempts[1]["t"] - attempts[0]["t"]
        gap2 = attempts[2]["t"] - attempts[1]["t"]
        # The backoff sleeps are loop timers, which uvloop may fire up to ~1 ms early.
        assert 0.099 <= gap1 < 0.25, gap1
        assert 0.199 <= gap2 < 0.35, gap2
        assert gap2 > gap1
        assert d.stop() == 0
        assert d.history("flaky")[0]["attempts"] == 3

    def test_io_timeout_cancels_promptly(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.hang]
            type = "nap"
            on = "startup"
            timeout = "300ms"
            [jobs.hang.options]
            seconds = 10.0
            """,
            PLUGINS,
        ).start()
        run = d.wait_for("run", job="hang", timeout=3)[0]
        assert run["outcome"] == "timed_out"
        assert 0.298 <= run["duration"] < 1.0  # uvloop timers may fire ~1 ms early
        assert "timed out" in run["error"]

    def test_blocking_timeout_marks_thread_stuck_and_daemon_goes_on(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.stuck]
            type = "block"
            on = "startup"
            timeout = "300ms"
            [jobs.stuck.options]
            seconds = 30.0

            [jobs.tick]
            type = "nap"
            every = "200ms"
            """,
            PLUGINS,
        ).start()
        run = d.wait_for("run", job="stuck", timeout=3)[0]
        assert run["outcome"] == "timed_out"
        assert run["duration"] < 1.0
        stuck = d.wait_for("thread_stuck", timeout=2)[0]
        assert "stuck" in stuck["run"]
        before = len(d.events("run", job="tick"))
        d.wait_for("run", job="tick", outcome="succeeded", count=before + 3, timeout=3)


class TestJitterAndSelection:
    """Jitter delays within bounds; disabled jobs never run; broken jobs are shown and skipped."""

    def test_jitter_starts_within_tick_and_tick_plus_jitter(self, daemon_factory) -> None:
        d = daemon_factory(
            '[jobs.j]\ntype = "nap"\nevery = "300ms"\njitter = "200ms"\n', PLUGINS
        ).start()
        runs = d.wait_for("run", job="j", count=5, timeout=5)
        lates = [r["late"] for r in runs]
        assert all(0 <= late <= 0.2 + 0.05 for late in lates), lates
        assert max(lates) > 0.02, lates  # jitter was applied at all
        ticks = [r["scheduled"] for r in d.history("j")]
        assert all(on_grid(t, 0.3) for t in ticks), ticks

    def test_disabled_job_never_runs(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.off]
            type = "nap"
            every = "100ms"
            enabled = false

            [jobs.on]
            type = "nap"
            every = "100ms"
            """,
            PLUGINS,
        ).start()
        assert d.events("started")[0]["jobs"] == 1
        d.wait_for("run", job="on", count=4, timeout=3)
        assert d.events("run", job="off") == []
        assert d.events(job="off") == []
        assert d.history("off") == []

    def test_broken_plugin_job_is_shown_and_skipped(self, daemon_factory) -> None:
        bad = 'raise RuntimeError("plugin import exploded")\n'
        d = daemon_factory(
            """
            [jobs.ghost]
            type = "ghost_type"
            every = "200ms"

            [jobs.tick]
            type = "nap"
            every = "200ms"
            """,
            {**PLUGINS, "bad.py": bad},
        ).start()
        started = d.events("started")[0]
        assert started["broken"] == ["ghost"]
        broken = d.events("plugin_broken")
        assert broken and broken[0]["origin"].endswith("bad.py")
        assert "plugin import exploded" in broken[0]["error"]
        d.wait_for("skipped", job="ghost", reason="broken", timeout=3)
        d.wait_for("run", job="tick", outcome="succeeded", count=5, timeout=5)
        assert d.events("run", job="ghost") == []
        assert d.stop() == 0
        # Every tick of a broken job is skipped: the first is logged at once, the ones after
        # it as one span (here at the stop), counted. ~5 ticks went by, as for "tick".
        skips = d.events("skipped", job="ghost", reason="broken")
        assert len(skips) == 2 and skips[1]["count"] >= 3, skips


def _downtime(
    daemon_factory: Callable[..., DaemonProc], config: str, downtime: float = 1.5
) -> tuple[DaemonProc, float, float]:
    """Run a daemon, stop it, wait ``downtime``, start it again on the same state.
    Returns the second daemon, the last tick handled before the stop and the restart time."""
    first = daemon_factory(config, PLUGINS)
    first.start()
    first.wait_for("run", job="c", outcome="succeeded", count=2, timeout=3)
    assert first.stop() == 0
    cursor = last_tick(first, "c")
    time.sleep(downtime)  # the downtime is what this test is about
    restarted = time.time()
    second = daemon_factory(config, PLUGINS).start()
    return second, cursor, restarted


class TestCatchup:
    """Ticks missed while the daemon was down are handled by `catchup`."""

    def test_latest_runs_once_and_coalesces_the_rest(self, daemon_factory) -> None:
        config = '[jobs.c]\ntype = "nap"\nevery = "200ms"\ncatchup = "latest"\n'
        d, cursor, _ = _downtime(daemon_factory, config)
        skip = d.wait_for("skipped", job="c", timeout=3)[0]
        assert skip["reason"] == "coalesced"  # within the default grace of 60s
        assert skip["count"] > 1
        assert skip["first"] == iso(cursor + 0.2)
        first_run = d.wait_for("run", job="c", timeout=3)[0]
        assert first_run["late"] < 0.4  # immediate, for the latest missed tick
        assert d.stop() == 0
        # The due ticks are the skipped ones and the one that ran, the latest.
        due = [cursor + 0.2 * k for k in range(1, skip["count"] + 2)]
        assert skip["last"] == iso(due[-2])
        ran = [r["scheduled"] for r in d.history("c") if cursor < r["scheduled"] <= due[-1] + EPS]
        assert len(ran) == 1 and abs(ran[0] - due[-1]) < EPS, (ran, due)
        # The latest tick due when the job first looked, which is a moment after the
        # "started" line was stamped: a tick can fall in between (32 µs was seen).
        assert due[-1] - 0.05 <= started_at(d) < due[-1] + 0.2 + EPS

    @pytest.mark.parametrize("overlap", ["default", "queue"])
    def test_all_runs_every_missed_tick(self, daemon_factory, overlap: str) -> None:
        config = '[jobs.c]\ntype = "nap"\nevery = "200ms"\ncatchup = "all"\n'
        if overlap != "default":
            config += f'overlap = "{overlap}"\n'
        d, cursor, _ = _downtime(daemon_factory, config)
        until = started_at(d) - 0.01
        # Ticks as whole multiples of 200ms, so float rounding cannot spoil the comparison.
        expected = set(range(round(cursor * 5) + 1, math.floor(until * 5) + 1))
        assert len(expected) >= 6
        deadline = time.monotonic() + 3
        while (missing := expected - {round(r["scheduled"] * 5) for r in d.history("c")}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        skips = [(s["reason"], s["first"]) for s in d.events("skipped", job="c")]
        assert not missing, f"{len(missing)} of {len(expected)} missed ticks never ran; {skips=}"
        assert d.events("skipped", job="c") == []
        assert d.stop() == 0
        rows = [r for r in d.history("c") if cursor < r["scheduled"] <= until]
        assert {r["outcome"] for r in rows} == {"succeeded"}

    def test_none_skips_missed_ticks_and_runs_none_late(self, daemon_factory) -> None:
        config = '[jobs.c]\ntype = "nap"\nevery = "200ms"\ncatchup = "none"\ngrace = "50ms"\n'
        d, cursor, restarted = _downtime(daemon_factory, config)
        skip = d.wait_for("skipped", job="c", reason="missed", timeout=3)[0]
        assert skip["count"] >= 5
        assert skip["first"] == iso(cursor + 0.2)
        d.wait_for("run", job="c", count=2, timeout=3)
        assert d.stop() == 0
        lates = [r["late"] for r in d.events("run", job="c")]
        assert all(late <= 0.05 + 0.02 for late in lates), lates
        late_runs = [
            r for r in d.history("c") if cursor < r["scheduled"] <= restarted - 0.05 - 0.02
        ]
        assert late_runs == []


class TestSharedState:
    """An io job's locked writes and a blocking job's return value reach the state db."""

    def test_io_state_and_blocking_result_persisted(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.counter]
            type = "count"
            every = "200ms"
            [jobs.counter.options]
            key = "io-counter"

            [jobs.answer]
            type = "block"
            on = "startup"
            [jobs.answer.options]
            answer = 42
            """,
            PLUGINS,
        ).start()

        def shared() -> dict[str, Any]:
            with d.db() as db:
                return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM shared")}

        state = poll(lambda: (s := shared()).get("io-counter", 0) >= 3 and "answer" in s and s)
        assert state["answer"] == {"answer": 42}
        assert isinstance(state["counter"], int) and state["counter"] >= 1
        assert d.stop() == 0
        final = shared()
        # The returned count and the locked counter are the same sequence.
        assert final["io-counter"] == final["counter"]
