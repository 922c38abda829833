"""Blocking runs that hang for ever (issue 8, item 14), against the real daemon: the thread
pool adds a thread for each stuck one up to ``thread_workers_max``, reports itself exhausted
past that cap (log, status, metrics) and skips blocking runs with reason ``exhausted``, and
gives the capacity back when the hung calls return."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import DaemonProc, daemon_table, free_port, poll, run_cli

HANG = """
import os
import threading
import time

import taskd


def hang(release: str, log: str) -> str:
    # Hangs until the file ``release`` appears: the test's switch to end the hang.
    with open(log, "a") as f:
        f.write(f"{threading.get_ident()}\\n")
    while not os.path.exists(release):
        time.sleep(0.02)
    return "released"


def quick() -> str:
    return "done"


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("hang", hang, kind="blocking"),
        taskd.JobType("quick", quick, kind="blocking"),
    ]
"""

# Run by hand only: a one-shot far in the future never fires on its own (an hourly schedule
# would, when the hour turns during the test).
NEVER = "2099-01-01T00:00:00Z"


def jobs(tmp_path: Path, *, tick: bool = False) -> str:
    text = f"""
    [jobs.hang]
    type = "hang"
    at = {NEVER}
    timeout = "300ms"
    [jobs.hang.options]
    release = "{tmp_path / "release"}"
    log = "{tmp_path / "hangs.log"}"

    [jobs.quick]
    type = "quick"
    at = {NEVER}
    timeout = "5s"
    """
    if tick:
        text += """
    [jobs.tick]
    type = "quick"
    every = "200ms"
    """
    return text


def trigger(d: DaemonProc, job: str) -> subprocess.CompletedProcess[str]:
    return run_cli("trigger", job, "--wait", "-c", str(d.config_path), timeout=60)


def status(d: DaemonProc) -> dict[str, Any]:
    result = run_cli("status", "--json", "-c", str(d.config_path))
    assert result.returncode == 0, result.stderr
    daemon: dict[str, Any] = json.loads(result.stdout)["daemon"]
    return daemon


def hang_times(d: DaemonProc, count: int) -> None:
    """``count`` hang runs, one after another, each timed out with its thread stuck."""
    for _ in range(count):
        result = trigger(d, "hang")
        assert "timed_out" in result.stderr, result.stdout + result.stderr


def started_hangs(tmp_path: Path) -> int:
    log = tmp_path / "hangs.log"
    return len(log.read_text().split()) if log.exists() else 0


class TestCapacityKept:
    """Each stuck thread is replaced, so hangs no longer starve the other blocking jobs."""

    def test_more_hangs_than_workers_and_a_blocking_job_still_runs(
        self, daemon_factory, tmp_path: Path
    ) -> None:
        # The default cap (twice thread_workers) is enough here: no new key in the config.
        config = daemon_table(thread_workers="2") + jobs(tmp_path)
        d = daemon_factory(config, {"hang.py": HANG}).start()
        hang_times(d, 3)
        # Before item 14 the two stuck threads were the whole pool: this run never started
        # and timed out after 5 s.
        result = trigger(d, "quick")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "quick: succeeded" in result.stdout
        assert started_hangs(tmp_path) == 3  # the third hang got a thread of its own too
        d.wait_for("thread_stuck", count=3, timeout=5)
        threads = status(d)["threads"]
        assert (threads["workers"], threads["max"], threads["stuck"]) == (2, 4, 3), threads
        assert threads["exhausted"] is None, threads


def exhausted_skips(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith('taskd_skips_total{job_name="tick",reason="exhausted"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class TestExhausted:
    """Past the cap the pool is exhausted: said once, shown by status and metrics, blocking
    runs skipped with reason ``exhausted``; it clears when the hung calls return."""

    def test_exhausted_skips_then_recovers(self, daemon_factory, tmp_path: Path) -> None:
        port = free_port()
        config = daemon_table(
            thread_workers="2", thread_workers_max="3", metrics_address=f'"127.0.0.1:{port}"'
        ) + jobs(tmp_path, tick=True)
        d = daemon_factory(config, {"hang.py": HANG}).start()
        d.wait_for("run", job="tick", outcome="succeeded", timeout=10)
        hang_times(d, 3)
        d.wait_for("thread_pool_exhausted", timeout=5)

        # A scheduled blocking tick is skipped with the new reason, as a warning line.
        skipped = d.wait_for("skipped", job="tick", reason="exhausted", timeout=10)
        assert all(s["level"] == "warning" for s in skipped)
        # A manual run is refused with a reason that says what to do.
        refused = trigger(d, "quick")
        assert refused.returncode != 0
        assert "thread pool is exhausted" in refused.stderr, refused.stderr
        assert "thread_workers_max" in refused.stderr, refused.stderr

        threads = status(d)["threads"]
        assert threads["stuck"] == 3 and threads["max"] == 3, threads
        assert "3 of 3 threads are stuck" in threads["exhausted"], threads
        text = run_cli("status", "-c", str(d.config_path)).stdout
        assert "threads: EXHAUSTED" in text, text
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        body = metrics.decode()
        assert "taskd_thread_pool_exhausted 1.0" in body
        assert 'taskd_skips_total{job_name="tick",reason="exhausted"}' in body

        # Said once per episode, however many runs it skips (each counted at once; the log
        # adds the ones after the first up per span).
        poll(lambda: exhausted_skips(port) >= 6, timeout=10)
        assert len(d.events("thread_pool_exhausted")) == 1

        # The hung calls return: the capacity comes back and the extra threads go.
        (tmp_path / "release").touch()
        d.wait_for("thread_pool_recovered", timeout=10)
        d.wait_for("thread_unstuck", count=3, timeout=10)
        ok = trigger(d, "quick")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        before = len(d.events("run", job="tick", outcome="succeeded"))
        d.wait_for("run", job="tick", outcome="succeeded", count=before + 2, timeout=10)

        def settled() -> dict[str, Any] | None:
            threads: dict[str, Any] = status(d)["threads"]
            return threads if threads["alive"] <= 2 else None

        threads = poll(settled, timeout=10)
        assert threads["stuck"] == 0 and threads["exhausted"] is None, threads
        assert "threads:" not in run_cli("status", "-c", str(d.config_path)).stdout
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert "taskd_thread_pool_exhausted 0.0" in body.decode()
        assert d.stop() == 0


class TestStopWithStuckThreads:
    """A stuck thread never holds up the daemon's exit."""

    def test_stop_does_not_wait_for_hung_calls(self, daemon_factory, tmp_path: Path) -> None:
        config = daemon_table(thread_workers="1", thread_workers_max="2") + jobs(tmp_path)
        d = daemon_factory(config, {"hang.py": HANG}).start()
        hang_times(d, 2)
        d.wait_for("thread_pool_exhausted", timeout=5)
        assert d.stop(timeout=15) == 0
        stopped = d.events("stopped")[0]
        assert stopped["stuck_threads"] == 2


class TestConfig:
    """thread_workers_max is checked like the other [daemon] keys."""

    def test_max_below_workers_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "taskd.toml"
        path.write_text("[daemon]\nthread_workers = 4\nthread_workers_max = 3\n")
        result = run_cli("check", "-c", str(path))
        assert result.returncode != 0
        err = result.stderr + result.stdout
        assert f"{path}:3: daemon.thread_workers_max:" in err, err
        assert "at least thread_workers (4)" in err, err
