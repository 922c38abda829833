"""Limits on a cpu run, against the real daemon: max_memory is enforced by the kernel
(RLIMIT_DATA) as the run allocates, not found later by a poll."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.helpers import DaemonProc, poll, run_cli

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20

CPU = """
import os
import pathlib
import time

import taskd


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _note(path, text):
    tmp = path + ".tmp"
    pathlib.Path(tmp).write_text(text)
    os.replace(tmp, path)


def grab(note: str, chunk_mib: int = 64, total_mib: int = 640, hold: float = 2.0):
    '''Allocate ``total_mib`` quickly, ``chunk_mib`` at a time, noting the worker's peak RSS
    after each chunk; then hold it a while.'''
    hold_on = []
    try:
        for _ in range(total_mib // chunk_mib):
            hold_on.append(b"x" * (chunk_mib << 20))
            _note(note, f"{os.getpid()} {_peak_rss()}")
    except MemoryError:
        hold_on.clear()  # let go before noting, so the note itself can be written
        _note(note, f"{os.getpid()} {_peak_rss()}")
        raise
    time.sleep(hold)
    return len(hold_on)


def small():
    return os.getpid()


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("grab", grab, kind="cpu"), taskd.JobType("small", small, kind="cpu")]
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TestMaxMemory:
    """A 200 MiB max_memory stops a run that allocates fast, near 200 MiB."""

    @pytest.mark.parametrize("chunk_mib", [64, 8])
    def test_a_fast_allocation_stops_at_the_limit(
        self, daemon_factory, tmp_path: Path, chunk_mib: int
    ) -> None:
        note = tmp_path / "note"
        d: DaemonProc = daemon_factory(
            f"""
            [jobs.hog]
            type = "grab"
            on = "startup"
            max_memory = "200MiB"
            [jobs.hog.options]
            note = "{note}"
            chunk_mib = {chunk_mib}

            [jobs.after]
            type = "small"
            every = "1h"
            """,
            {"cpu.py": CPU},
        ).start()
        run = d.wait_for("run", job="hog", timeout=30)[0]
        worker, peak = (int(x) for x in note.read_text().split())
        print(f"peak RSS of the worker: {peak / MiB:.0f} MiB")
        assert run["outcome"] == "failed", run
        assert "max_memory=209715200 bytes (200.0 MiB)" in run["error"], run
        # The kernel refused the allocation that would cross the limit: the peak is the
        # limit plus the interpreter's own code and libraries, not the 431 MiB and more a
        # poll every 0.5 s let through.
        assert peak < 250 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
        # The worker, its state in doubt, was replaced, not counted as a death; the next
        # run gets a fresh worker.
        result = run_cli("trigger", "after", "--wait", "-c", str(d.config_path), timeout=30)
        assert result.returncode == 0, result.stderr
        after = d.wait_for("run", job="after", timeout=10)[0]
        assert after["outcome"] == "succeeded"
        assert d.events("procpool.worker_died") == []
        poll(lambda: not alive(worker), timeout=10)
        assert d.stop() == 0
