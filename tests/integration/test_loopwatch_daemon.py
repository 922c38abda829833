"""A real daemon names the io job that blocks its loop: the job, the run id of the same run's
`run` line, and the plugin file and line of the blocking call."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import daemon_table

HOG = """
import time

import taskd


async def hog(ctx) -> str:
    time.sleep(1)  # BLOCKS: an io job must await, not sleep
    return "done"


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("hog", hog)]
"""
SLEEP_LINE = next(n for n, line in enumerate(HOG.splitlines(), 1) if "# BLOCKS" in line)


@pytest.mark.timeout(40)
class TestBlockedLoopReport:
    """`loop_blocked` names the job, the run and the plugin's line; `loop_unblocked` follows."""

    @pytest.mark.parametrize(
        ("loop", "overlap"),
        [
            ("uvloop", "skip"),  # an inline run, on the job's own task (taskd-job:hog)
            ("asyncio", "allow"),  # a run with its own task (taskd-run:hog:<run id>)
        ],
    )
    def test_names_job_run_and_line(self, daemon_factory, loop: str, overlap: str) -> None:
        config = daemon_table(loop_block_threshold='"200ms"') + (
            f'[jobs.hog]\ntype = "hog"\nevery = "2s"\noverlap = "{overlap}"\n'
        )
        env = {"TASKD_LOOP": "asyncio"} if loop == "asyncio" else {}
        d = daemon_factory(config, {"hog.py": HOG}, env=env).start()
        assert d.events("started")[0]["loop"] == loop
        blocked = d.wait_for("loop_blocked", timeout=10)[0]
        assert blocked["level"] == "warning"
        assert blocked["job"] == "hog"
        assert blocked["run_id"]
        assert 0.2 <= blocked["blocked_for"] < 1.0
        file, _, where = blocked["frame"].rpartition(":")
        assert Path(file).resolve() == (d.dir / "plugins.d" / "hog.py").resolve()
        assert where == f"{SLEEP_LINE} in hog"
        assert blocked["stack"][-1].endswith(f"hog.py:{SLEEP_LINE} hog")
        run = d.wait_for("run", job="hog", run_id=blocked["run_id"], timeout=5)[0]
        assert run["outcome"] == "succeeded"
        unblocked = d.wait_for("loop_unblocked", run_id=blocked["run_id"], timeout=5)[0]
        assert unblocked["job"] == "hog"
        assert unblocked["blocked_for"] >= blocked["blocked_for"]
        assert d.stop() == 0
