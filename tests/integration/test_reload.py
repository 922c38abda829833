"""SIGHUP reloads a running daemon: unchanged jobs keep their timing, changed ones switch at
their next run, removed ones finish, new ones start; an invalid config changes nothing."""

from __future__ import annotations

import itertools
import os
import signal
import time
from typing import Any

import pytest

from tests.helpers import DaemonProc

REL = """
import asyncio

import taskd


async def echo(ctx, tag: str = "", seconds: float = 0.0) -> dict:
    ctx.log.info("echo_start", tag=tag)
    if seconds:
        await asyncio.sleep(seconds)
    ctx.log.info("echo_done", tag=tag)
    return {"tag": tag}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("echo", echo)]
"""

VERSIONED = """
import taskd

VERSION = {version}


async def ver(ctx) -> dict:
    ctx.log.info("ver", v=VERSION)
    return {{"v": VERSION}}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("ver", ver)]
"""

EXTRA = """
import taskd


async def extra(ctx, word: str = "") -> dict:
    ctx.log.info("extra_ran", word=word)
    return {"word": word}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("extra", extra)]
"""

BOOM = 'raise RuntimeError("boom at import")\n'

TICK = """
[jobs.tick]
type = "echo"
every = "200ms"
"""

EPS = 1e-6


def after(d: DaemonProc, line: dict[str, Any], event: str, **fields: Any) -> list[dict[str, Any]]:
    """Lines matching ``event``/``fields`` logged after ``line``."""
    lines = d.events()
    start = next(i for i, x in enumerate(lines) if x is line)
    return [
        x
        for x in lines[start + 1 :]
        if x.get("event") == event and all(x.get(k) == v for k, v in fields.items())
    ]


def reload(d: DaemonProc, config: str | None = None) -> dict[str, Any]:
    """Write ``config`` (if given), send SIGHUP and wait for the resulting "reloaded" line."""
    before = len(d.events("reloaded")) + len(d.events("reload_failed"))
    if config is not None:
        d.write_config(config)
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done = d.events("reloaded") + d.events("reload_failed")
        if len(done) > before:
            return max(done, key=lambda x: x["timestamp"])
        time.sleep(0.02)
    raise AssertionError("no reloaded / reload_failed line within 5s")


def more_runs(d: DaemonProc, job: str, n: int, timeout: float = 3.0) -> None:
    have = len(d.events("run", job=job, outcome="succeeded"))
    d.wait_for("run", job=job, outcome="succeeded", count=have + n, timeout=timeout)


class TestReloadApplies:
    """A valid reload applies the difference and leaves the rest alone."""

    def test_unchanged_config_keeps_timing(self, daemon_factory) -> None:
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", count=3, timeout=3)
        line = reload(d)
        assert line["event"] == "reloaded"
        assert (line["added"], line["changed"], line["removed"]) == ([], [], [])
        more_runs(d, "tick", 3)
        assert d.stop() == 0
        ticks = sorted(r["scheduled"] for r in d.history("tick"))
        assert len(ticks) >= 6
        assert all(abs((b - a) - 0.2) < EPS for a, b in itertools.pairwise(ticks)), ticks

    def test_changed_job_switches_at_next_run(self, daemon_factory) -> None:
        config = """
        [jobs.slow]
        type = "echo"
        every = "400ms"
        [jobs.slow.options]
        tag = "{tag}"
        seconds = 0.6
        """
        d = daemon_factory(config.format(tag="old"), {"rel.py": REL}).start()
        going = d.wait_for("echo_start", job="slow", tag="old", timeout=3)[0]
        line = reload(d, config.format(tag="new"))
        assert line["event"] == "reloaded" and line["changed"] == ["slow"]
        # The run that was going finishes under its old definition ...
        done = d.wait_for("echo_done", job="slow", run_id=going["run_id"], timeout=3)[0]
        assert done["tag"] == "old"
        run = d.wait_for("run", job="slow", run_id=going["run_id"], timeout=3)[0]
        assert run["outcome"] == "succeeded"
        # ... and every run started after the reload uses the new options.
        d.wait_for("echo_done", job="slow", tag="new", timeout=3)
        assert {x["tag"] for x in after(d, line, "echo_start", job="slow")} == {"new"}

    def test_removed_job_finishes_its_run_and_gets_no_more(self, daemon_factory) -> None:
        config = """
        [jobs.slow]
        type = "echo"
        every = "300ms"
        [jobs.slow.options]
        seconds = 0.8
        """
        d = daemon_factory(config + TICK, {"rel.py": REL}).start()
        going = d.wait_for("echo_start", job="slow", timeout=3)[0]
        line = reload(d, TICK)
        assert line["event"] == "reloaded" and line["removed"] == ["slow"]
        run = d.wait_for("run", job="slow", run_id=going["run_id"], timeout=3)[0]
        assert run["outcome"] == "succeeded"
        more_runs(d, "tick", 4)  # 800ms: longer than a tick of the removed job
        assert after(d, line, "echo_start", job="slow") == []
        assert len(after(d, line, "run", job="slow")) == 1

    def test_readded_job_does_not_overlap_its_retiring_run(self, daemon_factory) -> None:
        slow = '\n[jobs.slow]\ntype = "echo"\nevery = "300ms"\n[jobs.slow.options]\nseconds = 1.2\n'
        d = daemon_factory(TICK + slow, {"rel.py": REL}).start()
        going = d.wait_for("echo_start", job="slow", timeout=3)[0]
        assert reload(d, TICK)["removed"] == ["slow"]
        assert reload(d, TICK + slow)["added"] == ["slow"]
        d.wait_for("run", job="slow", run_id=going["run_id"], timeout=3)
        assert d.stop() == 0
        # overlap = "skip" (the default) holds across the removal and the return: the job
        # is the same job, and its old run was still going.
        rows = sorted(d.history("slow"), key=lambda r: r["started"])
        together = [
            (a["run_id"], b["run_id"])
            for a, b in itertools.pairwise(rows)
            if b["started"] < a["started"] + a["duration"]
        ]
        assert together == [], together

    def test_new_job_starts(self, daemon_factory) -> None:
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", timeout=3)
        line = reload(d, TICK + '\n[jobs.fresh]\ntype = "echo"\nevery = "200ms"\n')
        assert line["event"] == "reloaded" and line["added"] == ["fresh"]
        assert line["changed"] == [] and line["removed"] == []
        d.wait_for("run", job="fresh", outcome="succeeded", count=2, timeout=3)

    def test_new_plugin_file_and_job_using_it(self, daemon_factory) -> None:
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", timeout=3)
        d.write_plugin("extra.py", EXTRA)
        config = (
            TICK + '\n[jobs.x]\ntype = "extra"\nevery = "200ms"\n[jobs.x.options]\nword = "hi"\n'
        )
        line = reload(d, config)
        assert line["event"] == "reloaded" and line["added"] == ["x"]
        d.wait_for("extra_ran", job="x", word="hi", timeout=3)
        d.wait_for("run", job="x", outcome="succeeded", timeout=3)

    def test_changed_plugin_file_is_picked_up(self, daemon_factory) -> None:
        config = '[jobs.v]\ntype = "ver"\nevery = "200ms"\n'
        d = daemon_factory(config, {"ver.py": VERSIONED.format(version=1)}).start()
        d.wait_for("ver", job="v", v=1, count=2, timeout=3)
        d.write_plugin("ver.py", VERSIONED.format(version=2))
        line = reload(d)
        assert line["event"] == "reloaded" and line["changed"] == ["v"]
        d.wait_for("ver", job="v", v=2, count=2, timeout=3)
        assert {x["v"] for x in after(d, line, "ver", job="v")} == {2}


INVALID = {
    "syntax": (TICK.replace('"200ms"', '"200ms'), ["taskd.toml", "not valid TOML"]),
    "unknown_key": (TICK + 'timout = "1s"\n', ["taskd.toml", "jobs.tick.timout", "timeout"]),
    "unknown_type": (TICK.replace('"echo"', '"nope"'), ["taskd.toml", "jobs.tick.type", "nope"]),
}


class TestReloadRejected:
    """An invalid config or plugin is rejected as a whole; the old jobs keep running."""

    @pytest.mark.parametrize("case", sorted(INVALID))
    def test_invalid_config_keeps_old_jobs(self, daemon_factory, case: str) -> None:
        text, needles = INVALID[case]
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", timeout=3)
        line = reload(d, text)
        assert line["event"] == "reload_failed"
        errors = "\n".join(line["errors"])
        for needle in needles:
            assert needle in errors, (needle, errors)
        more_runs(d, "tick", 3)
        assert d.events("reloaded") == []
        assert d.proc is not None and d.proc.poll() is None

    def test_plugin_broken_by_an_edit_is_rejected(self, daemon_factory) -> None:
        """An edit that breaks a plugin that jobs use keeps the working version running."""
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", timeout=3)
        d.write_plugin("rel.py", BOOM)
        line = reload(d)
        assert line["event"] == "reload_failed"
        errors = "\n".join(line["errors"])
        assert "rel.py" in errors and "boom at import" in errors, errors
        assert "jobs.tick would be broken" in errors, errors
        more_runs(d, "tick", 3)
        assert d.events("reloaded") == []

    def test_new_broken_file_no_job_uses_is_a_warning(self, daemon_factory) -> None:
        """A half-written new plugin file that no job needs does not hold up a reload."""
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", timeout=3)
        d.write_plugin("boom.py", BOOM)
        line = reload(d, TICK + '\n[jobs.tock]\ntype = "echo"\nevery = "200ms"\n')
        assert line["event"] == "reloaded" and line["added"] == ["tock"], line
        warning = d.wait_for("reload_warning", timeout=2)[0]["warning"]
        assert "boom.py" in warning and "no job uses it" in warning, warning
        more_runs(d, "tock", 2)

    def test_new_broken_file_a_new_job_needs_is_rejected(self, daemon_factory) -> None:
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", timeout=3)
        d.write_plugin("boom.py", BOOM)
        line = reload(d, TICK + '\n[jobs.new]\ntype = "boomer"\nevery = "1s"\n')
        assert line["event"] == "reload_failed", line
        errors = "\n".join(line["errors"])
        assert "boom.py" in errors and "jobs.new would be broken" in errors, errors
        more_runs(d, "tick", 2)

    def test_plugin_broken_since_start_does_not_block_reloads(self, daemon_factory) -> None:
        # A notifier missing a library at start is tolerated then, and still is on reload;
        # only plugins that break now reject a reload.
        d = daemon_factory(
            TICK, {"rel.py": REL, "mailer.py": "import no_such_library_for_taskd\n"}
        ).start()
        d.wait_for("run", job="tick", timeout=3)
        line = reload(d, TICK + '\n[jobs.tock]\ntype = "echo"\nevery = "200ms"\n')
        assert line["event"] == "reloaded", line
        assert line["added"] == ["tock"]
        more_runs(d, "tock", 2)

    def test_job_needing_a_plugin_accepted_broken_earlier_is_rejected(self, daemon_factory) -> None:
        """A broken file let through as a warning (no job used it) does not let a later job
        that needs it in broken: that reload is rejected."""
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", timeout=3)
        d.write_plugin("boom.py", BOOM)
        assert reload(d)["event"] == "reloaded"
        line = reload(d, TICK + '\n[jobs.new]\ntype = "boomer"\nevery = "1s"\n')
        assert line["event"] == "reload_failed", line
        assert "jobs.new would be broken" in "\n".join(line["errors"])

    def test_broken_job_is_not_changed_by_another_broken_plugin(self, daemon_factory) -> None:
        """A job broken since the start stays the same job when one more plugin breaks."""
        config = TICK + '\n[jobs.mail]\ntype = "mail"\nevery = "1h"\n'
        d = daemon_factory(
            config, {"rel.py": REL, "mailer.py": "import no_such_library_for_taskd\n"}
        ).start()
        d.wait_for("run", job="tick", timeout=3)
        d.write_plugin("boom.py", BOOM)
        line = reload(d)
        assert line["event"] == "reloaded", line
        assert line["changed"] == [], line
        assert len(d.events("job_broken", job="mail")) == 1  # logged at start only

    def test_sighup_storm_is_coalesced(self, daemon_factory) -> None:
        d = daemon_factory(TICK, {"rel.py": REL}).start()
        d.wait_for("run", job="tick", timeout=3)
        for _ in range(20):
            os.kill(d.pid, signal.SIGHUP)
        d.wait_for("reloaded", timeout=5)
        more_runs(d, "tick", 4)  # 800ms: time for any further coalesced reload to finish
        reloads = d.events("reloaded")
        assert 1 <= len(reloads) <= 3, len(reloads)
        assert all(r["added"] == r["changed"] == r["removed"] == [] for r in reloads)
        assert d.events("reload_failed") == []
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop() == 0
