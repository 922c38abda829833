"""A cpu run's processes end with it: after a timeout, a stop past shutdown_timeout, or a
run that ended fine, no descendant it started is left, not even one that called setsid() to
leave the worker's process group; and the worker reaps the orphans it inherits."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import DaemonProc, daemon_table, poll

pytestmark = pytest.mark.timeout(90)

CPU = """
import os
import pathlib
import subprocess
import sys
import time

import taskd


def _note(path, text):
    tmp = path + ".tmp"
    pathlib.Path(tmp).write_text(text)
    os.replace(tmp, path)


def detach(note: str, hang: float = 0.0, how: str = "double_fork"):
    '''Start a process that leaves the worker's group and session, note its pid and the
    worker's, then hang (or return).'''
    if how == "double_fork":
        # A daemon's way: fork, setsid, fork again, the middle one exits: the grandchild
        # is an orphan in a session of its own.
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                time.sleep(1000)
                os._exit(0)
            os._exit(0)
        os.close(w)
        pid = int(os.read(r, 32))
        os.close(r)
        os.waitpid(middle, 0)
    else:  # what `setsid sleep 1000` does: a child in a new session
        pid = subprocess.Popen(["sleep", "1000"], start_new_session=True).pid
    # A zombie-to-be: a child left unwaited (its Popen object dropped).
    subprocess.Popen([sys.executable, "-c", "pass"])
    _note(note, f"{os.getpid()} {pid}")
    time.sleep(hang)
    return pid


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("detach", detach, kind="cpu")]
"""


def job(name: str, note: Path, *, hang: float, how: str, extra: str = "") -> str:
    return f"""
    [jobs.{name}]
    type = "detach"
    on = "startup"
    {extra}
    [jobs.{name}.options]
    note = "{note}"
    hang = {hang}
    how = "{how}"
    """


def alive(pid: int) -> bool:
    """A zombie counts as dead: it runs nothing and holds nothing but its pid."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def noted(note: Path, *, running: bool = True) -> tuple[int, int]:
    """The worker's pid and the detached process's, once the job noted them; with
    ``running``, check that the detached process did leave the worker's session."""
    poll(note.exists, timeout=20)
    worker, grandchild = (int(x) for x in note.read_text().split())
    if running:
        assert alive(grandchild), "the job's detached process did not start"
        assert os.getsid(grandchild) != os.getsid(worker)
    return worker, grandchild


def kill_leftover(pid: int) -> None:
    """Never leave a `sleep 1000` behind when the test fails."""
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["double_fork", "new_session"])
class TestDescendants:
    """Each way a job detaches a process: a daemon's double fork, a child in its own session."""

    def test_a_timeout_kills_the_detached_process(
        self, daemon_factory, tmp_path: Path, how: str
    ) -> None:
        note = tmp_path / "note"
        d: DaemonProc = daemon_factory(
            job("hang", note, hang=60, how=how, extra='timeout = "1s"'), {"cpu.py": CPU}
        ).start()
        _, grandchild = noted(note)
        try:
            run = d.wait_for("run", job="hang", timeout=20)[0]
            assert run["outcome"] == "timed_out", run
            poll(lambda: not alive(grandchild), timeout=5)
            assert d.stop() == 0
        finally:
            kill_leftover(grandchild)

    def test_a_stop_past_shutdown_timeout_kills_the_detached_process(
        self, daemon_factory, tmp_path: Path, how: str
    ) -> None:
        note = tmp_path / "note"
        config = daemon_table(shutdown_timeout='"1s"') + job("hang", note, hang=60, how=how)
        d: DaemonProc = daemon_factory(config, {"cpu.py": CPU}).start()
        _, grandchild = noted(note)
        try:
            d.signal(signal.SIGTERM)
            assert d.wait_exit(timeout=20) == 0
            poll(lambda: not alive(grandchild), timeout=5)
        finally:
            kill_leftover(grandchild)

    def test_a_run_that_ended_fine_leaves_no_process_and_no_zombie(
        self, daemon_factory, tmp_path: Path, how: str
    ) -> None:
        note = tmp_path / "note"
        d: DaemonProc = daemon_factory(job("quick", note, hang=0, how=how), {"cpu.py": CPU})
        d.start()
        worker, grandchild = noted(note, running=False)
        try:
            run = d.wait_for("run", job="quick", timeout=20)[0]
            assert run["outcome"] == "succeeded", run
            # Gone by the time the run's end is recorded: the run's processes end with it.
            assert not alive(grandchild)
            # The unwaited child and the orphans the worker inherited are reaped, not kept
            # as zombies; the worker itself serves on.
            time.sleep(0.2)
            assert alive(worker)
            assert psutil.Process(worker).children() == []
            assert d.stop() == 0
        finally:
            kill_leftover(grandchild)
