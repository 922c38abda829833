"""proctree.kill_tree against real process trees, including one that forks while it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from taskd.run import proctree

pytestmark = pytest.mark.timeout(60)


def tagged(tag: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose command line carries ``tag``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if tag in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def start_tree(tag: str, script: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), tag], env=env)


class TestKillTree:
    """Every descendant goes, whatever session it is in and however fast it forks."""

    def test_a_tree_that_keeps_forking_is_frozen_and_killed(self) -> None:
        tag = f"taskd-test-{uuid.uuid4()}"
        # Every process forks a child every few milliseconds, up to a few hundred in all.
        root = start_tree(
            tag,
            """
            import os, sys, time
            for _ in range(12):
                if os.fork() == 0:
                    os.setsid()
                    continue
                time.sleep(0.005)
            time.sleep(1000)
            """,
        )
        try:
            time.sleep(0.05)  # in the middle of its forking
            killed = proctree.kill_tree(root.pid, include_root=True)
            assert killed > 0
            assert root.wait(timeout=10) == -signal.SIGKILL
            deadline = time.monotonic() + 10
            while left := tagged(tag):
                assert time.monotonic() < deadline, f"{len(left)} descendants outlived the kill"
                time.sleep(0.05)
        finally:
            for proc in tagged(tag):
                proc.kill()


def test_a_subreaper_finds_orphaned_descendants() -> None:
    """In a subreaper, a double-forked grandchild stays a descendant, and kill_tree gets it."""
    tag = f"taskd-test-{uuid.uuid4()}"
    root = start_tree(
        tag,
        """
        import os, time
        from taskd.run import proctree
        assert proctree.become_subreaper()
        middle = os.fork()
        if middle == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(1000)
            os._exit(0)
        os.waitpid(middle, 0)  # from now on the root's only child is the orphan
        time.sleep(1000)
        """,
    )
    try:
        deadline = time.monotonic() + 10
        while not [p for p in tagged(tag) if p.pid != root.pid and p.ppid() == root.pid]:
            assert time.monotonic() < deadline, "the grandchild was not reparented to the root"
            time.sleep(0.02)
        assert proctree.kill_tree(root.pid, include_root=True) >= 1
        root.wait(timeout=10)
        deadline = time.monotonic() + 10
        while tagged(tag):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for proc in tagged(tag):
            proc.kill()
