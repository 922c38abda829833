"""Stopping: SIGTERM drains runs up to shutdown_timeout then cancels them, a second signal
forces the stop, hung threads cannot hold the exit, signals during start-up are kept, and a
subprocess job's whole process group goes on timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil

from tests.helpers import REPO, DaemonProc, daemon_table, poll

SD = """
import asyncio
import pathlib
import time

import taskd


async def nap(ctx, seconds: float = 0.0) -> dict:
    ctx.log.info("nap_start", seconds=seconds)
    await asyncio.sleep(seconds)
    return {"slept": seconds}


def hang(marker: str, seconds: float = 3600.0) -> dict:
    pathlib.Path(marker).write_text("hanging")
    time.sleep(seconds)
    return {"slept": seconds}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("nap", nap), taskd.JobType("hang", hang, kind="blocking")]
"""

SLOW_IMPORT = """
import pathlib
import time

import taskd

pathlib.Path({marker!r}).write_text("importing")
time.sleep(1.5)


async def quick(ctx) -> dict:
    return {{}}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("quick", quick)]
"""


def nap_job(seconds: float) -> str:
    return f'[jobs.slow]\ntype = "nap"\non = "startup"\n[jobs.slow.options]\nseconds = {seconds}\n'


def order(d: DaemonProc, *events: str) -> list[int]:
    """Positions of the first line of each event in the log (-1 if absent)."""
    lines = d.events()
    names = [x.get("event") for x in lines]
    return [names.index(e) if e in names else -1 for e in events]


class TestDrain:
    """SIGTERM lets running runs finish, up to shutdown_timeout."""

    def test_run_in_flight_finishes_and_exit_0(self, daemon_factory) -> None:
        d = daemon_factory(nap_job(1.0), {"sd.py": SD}).start()
        d.wait_for("nap_start", job="slow", timeout=3)
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=10) == 0
        draining = d.events("draining")[0]
        assert (draining["runs"], draining["jobs"]) == (1, ["slow"])
        run = d.events("run", job="slow")[0]
        assert run["outcome"] == "succeeded"
        assert run["duration"] >= 0.99  # the 1 s nap ran to its end (timers may fire ~1 ms early)
        assert d.events("cancelling_runs") == []
        assert [r["outcome"] for r in d.history("slow")] == ["succeeded"]

    def test_sighup_while_draining_does_not_force(self, daemon_factory) -> None:
        d = daemon_factory(nap_job(1.0), {"sd.py": SD}).start()
        d.wait_for("nap_start", job="slow", timeout=3)
        d.signal(signal.SIGTERM)
        d.wait_for("draining")
        d.signal(signal.SIGHUP)
        assert d.wait_exit(timeout=10) == 0
        d.wait_for("reload_ignored")
        assert d.events("forced_stop") == []
        assert d.events("run", job="slow")[0]["outcome"] == "succeeded"

    def test_run_past_shutdown_timeout_is_cancelled(self, daemon_factory) -> None:
        d = daemon_factory(
            daemon_table(shutdown_timeout='"500ms"') + nap_job(10.0), {"sd.py": SD}
        ).start()
        d.wait_for("nap_start", job="slow", timeout=3)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=10) == 0
        elapsed = time.monotonic() - t0
        assert 0.5 <= elapsed < 0.5 + 3, elapsed
        assert d.events("cancelling_runs")
        assert d.events("run", job="slow")[0]["outcome"] == "cancelled"
        assert [r["outcome"] for r in d.history("slow")] == ["cancelled"]
        assert d.events("stopped")[0]["forced"] is False

    def test_second_signal_forces_stop(self, daemon_factory) -> None:
        d = daemon_factory(nap_job(10.0), {"sd.py": SD}).start()  # shutdown_timeout 5s
        d.wait_for("nap_start", job="slow", timeout=3)
        d.signal(signal.SIGTERM)
        d.wait_for("draining", timeout=3)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=10) == 0
        assert time.monotonic() - t0 < 2.0
        assert d.events("forced_stop")
        assert d.events("stopped")[0]["forced"] is True
        assert d.events("run", job="slow")[0]["outcome"] == "cancelled"

    def test_hung_thread_does_not_hold_the_exit(self, daemon_factory, tmp_path: Path) -> None:
        marker = tmp_path / "hanging"
        config = daemon_table(shutdown_timeout='"500ms"') + (
            f'[jobs.hung]\ntype = "hang"\non = "startup"\n[jobs.hung.options]\nmarker = "{marker}"\n'
        )
        d = daemon_factory(config, {"sd.py": SD}).start()
        poll(marker.exists, timeout=3, interval=0.02)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=15) == 0
        # shutdown_timeout, then at most the grace the daemon gives cancelled runs, then out.
        assert time.monotonic() - t0 < 0.5 + 2.0 + 1.5
        assert d.events("thread_stuck")
        assert d.events("stopped")[0]["stuck_threads"] >= 1
        assert d.events("run", job="hung")[0]["outcome"] == "cancelled"


class TestSignalsDuringStartup:
    """A signal that arrives while plugins are still importing is kept, not fatal."""

    def _starting(self, daemon_factory, tmp_path: Path) -> DaemonProc:
        marker = tmp_path / "importing"
        d = daemon_factory(
            '[jobs.q]\ntype = "quick"\nevery = "200ms"\n',
            {"slow_import.py": SLOW_IMPORT.format(marker=str(marker))},
        )
        d.start(wait=False)
        poll(marker.exists, timeout=10, interval=0.02)
        assert d.events("started") == []
        return d

    def test_sighup_while_starting_reloads_after_start(self, daemon_factory, tmp_path) -> None:
        d = self._starting(daemon_factory, tmp_path)
        d.signal(signal.SIGHUP)
        d.wait_for("started", timeout=10)
        d.wait_for("reloaded", timeout=5)
        started, reloaded = order(d, "started", "reloaded")
        assert 0 <= started < reloaded
        d.wait_for("run", job="q", outcome="succeeded", count=2, timeout=3)
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop() == 0

    def test_sigterm_while_starting_stops_cleanly(self, daemon_factory, tmp_path) -> None:
        d = self._starting(daemon_factory, tmp_path)
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=10) == 0  # not -15: the signal was handled, not fatal
        # The stop ends the start; it does not wait for the import (issue 8, item 2).
        assert d.events("stopped_during_start", signal="SIGTERM")
        assert d.events("started") == []


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes in process group ``pgid``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


class TestCommandJob:
    """A subprocess job's whole process group is killed on timeout."""

    def test_timeout_kills_the_process_group(self, daemon_factory) -> None:
        source = (REPO / "plugins" / "command.py").read_text()
        d = daemon_factory(
            """
            [jobs.sh]
            type = "command"
            on = "startup"
            timeout = "500ms"
            [jobs.sh.options]
            cmd = "sleep 100 & sleep 100"
            """,
            {"command.py": source},
        ).start()
        pgid = d.wait_for("command started", job="sh", timeout=3)[0]["pid"]
        try:
            # The shell and both sleeps (one a grandchild, in the background) are up.
            poll(lambda: len(group_members(pgid)) >= 2, timeout=2, interval=0.02)
            run = d.wait_for("run", job="sh", timeout=5)[0]
            assert run["outcome"] == "timed_out"
            assert run["duration"] < 0.5 + 1.0
            poll(lambda: group_members(pgid) == [], timeout=2, interval=0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


HANGING_TO_THREAD = """
import time

import taskd


async def offload(ctx) -> None:
    ctx.log.info("offloading")
    await ctx.to_thread(time.sleep, 3600)


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("offload", offload)]
"""


class TestHungOffloadedThread:
    """A to_thread call still going after its run was cancelled does not hold the exit."""

    def test_exit_is_prompt(self, daemon_factory) -> None:
        d = daemon_factory(
            '[jobs.off]\ntype = "offload"\non = "startup"\ntimeout = "300ms"\n',
            {"off.py": HANGING_TO_THREAD},
        ).start()
        d.wait_for("run", job="off", outcome="timed_out", timeout=5)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=10) == 0
        assert time.monotonic() - t0 < 5


FAILS_SLOWLY = """
import asyncio

import taskd


async def flaky(ctx) -> None:
    ctx.log.info("attempt", n=ctx.attempt)
    await asyncio.sleep(0.5)
    raise RuntimeError("still down")


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("flaky", flaky)]
"""


class TestNoRetryWhileStopping:
    """A run that fails during the drain is not held for a retry backoff the stop cannot wait for."""

    def test_stop_is_not_held_by_backoff(self, daemon_factory) -> None:
        config = daemon_table(shutdown_timeout='"10s"') + (
            '[jobs.f]\ntype = "flaky"\non = "startup"\nretries = 3\nretry_backoff = "60s"\n'
        )
        d = daemon_factory(config, {"f.py": FAILS_SLOWLY}).start()
        d.wait_for("attempt", job="f", timeout=3)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=15) == 0
        assert time.monotonic() - t0 < 4  # not the 10 s shutdown_timeout
        (run,) = d.events("run", job="f")
        assert run["outcome"] == "failed" and run["attempt"] == 1
        assert d.events("cancelling_runs") == []
