"""Bounded results and errors, against the real daemon: a 32 MiB result fails its run (for a
cpu job, measured in the worker, so it never reaches the daemon) and a 5 MB exception message
is cut in the run line, the history row and the hooks."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.helpers import DaemonProc, daemon_table, peak_rss, run_cli

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20

PLUGIN = """
import json
import pathlib

import taskd


def big_cpu(mib: int = 32):
    return b"x" * (mib << 20)


async def big_io(ctx, mib: int = 32):
    return "x" * (mib << 20)


def big_blocking(mib: int = 32):
    return ["x" * 1024] * (mib << 10)


def loud_cpu(mib: int = 5):
    raise ValueError("m" * (mib << 20))


async def loud_io(ctx, mib: int = 5):
    raise ValueError("m" * (mib << 20))


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("big_cpu", big_cpu, kind="cpu"),
        taskd.JobType("big_io", big_io, kind="io"),
        taskd.JobType("big_blocking", big_blocking, kind="blocking"),
        taskd.JobType("loud_cpu", loud_cpu, kind="cpu"),
        taskd.JobType("loud_io", loud_io, kind="io"),
    ]


@taskd.hookimpl
def taskd_job_event(event):
    if event.error is not None:
        with open(pathlib.Path(__file__).parent.parent / "hook-errors.txt", "a") as fh:
            fh.write(json.dumps({"job": event.job, "len": len(event.error)}) + "\\n")
"""

BY_HAND = "".join(
    f'[jobs.{name}]\ntype = "{name}"\nevery = "1h"\n\n'
    for name in ("big_cpu", "big_io", "big_blocking", "loud_cpu", "loud_io")
)


def trigger(d: DaemonProc, job: str) -> None:
    result = run_cli("trigger", job, "--wait", "-c", str(d.config_path), timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)


@pytest.fixture
def daemon(daemon_factory) -> DaemonProc:
    return daemon_factory(daemon_table() + BY_HAND, {"big.py": PLUGIN}).start()


class TestBigResults:
    """A result over max_result_size (1 MiB by default) fails its run, cheaply."""

    def test_a_32_mib_cpu_result_fails_without_reaching_the_daemon(
        self, daemon: DaemonProc
    ) -> None:
        d = daemon
        for _ in range(3):
            trigger(d, "big_cpu")
        runs = d.wait_for("run", job="big_cpu", count=3, timeout=30)
        for run in runs:
            assert run["outcome"] == "failed", run
            assert "ResultTooLarge" in run["error"], run
            # Its repr, as stored, measured in the worker: never built, never sent.
            assert "the result (bytes) is more than 1048576 bytes as JSON" in run["error"], run
            assert "max_result_size=1048576 bytes (1 MiB)" in run["error"], run
            assert "job 'big_cpu'" not in run["error"], run  # no repeated prefix
        peak = peak_rss(d.pid)
        print(f"daemon peak RSS {peak / MiB:.0f} MiB")
        assert peak < 150 * MiB, f"the daemon grew to {peak / MiB:.0f} MiB"
        assert d.events("loop_blocked") == []
        assert d.stop() == 0
        size = sum(f.stat().st_size for f in (d.dir / "state").glob("state.db*"))
        print(f"state.db {size / 1024:.0f} KiB")
        assert size < 4 * MiB

    @pytest.mark.parametrize("job", ["big_io", "big_blocking"])
    def test_a_32_mib_io_or_blocking_result_fails(self, daemon: DaemonProc, job: str) -> None:
        d = daemon
        trigger(d, job)
        run = d.wait_for("run", job=job, timeout=30)[0]
        assert run["outcome"] == "failed", run
        assert "ResultTooLarge" in run["error"] and "max_result_size" in run["error"], run
        assert d.stop() == 0
        size = sum(f.stat().st_size for f in (d.dir / "state").glob("state.db*"))
        assert size < 4 * MiB


class TestLoudErrors:
    """A 5 MB exception message is cut to MAX_ERROR_TEXT (4096) characters, with a marker."""

    @pytest.mark.parametrize("job", ["loud_cpu", "loud_io"])
    def test_the_error_text_is_bounded_everywhere(self, daemon: DaemonProc, job: str) -> None:
        d = daemon
        trigger(d, job)
        run = d.wait_for("run", job=job, timeout=30)[0]
        assert run["outcome"] == "failed"
        assert "ValueError: mmmm" in run["error"][:40]
        cut = re.search(r"\.\.\. \[(\d+) more characters cut\]$", run["error"])
        assert cut and int(cut[1]) > 5_000_000, run["error"][-100:]
        assert len(run["error"]) < 4200
        assert max(len(line) for line in d.raw) < 8192
        assert d.stop() == 0
        rows = d.history(job)
        assert len(rows) == 1 and len(rows[0]["error"]) < 4200
        hooks = [
            json.loads(line)
            for line in (d.dir / "hook-errors.txt").read_text().splitlines()
            if json.loads(line)["job"] == job
        ]
        assert hooks and all(h["len"] < 4200 for h in hooks)
        assert os.path.getsize(d.dir / "state" / "state.db") < 4 * MiB
