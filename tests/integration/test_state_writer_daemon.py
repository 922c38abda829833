"""The state writer in the real daemon: kill -9 under load loses and doubles no run, a run is
in ``taskd history`` as soon as its line is logged, and a clean stop leaves no -wal."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

from tests.helpers import DaemonProc, run_cli

REC = """
import os

import taskd


async def rec(ctx) -> None:
    # Each run the job's code really starts, on record with the kernel (one O_APPEND write):
    # what the history is checked against.
    fd = os.open(os.environ["REC_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{ctx.run_id} {ctx.job} {ctx.scheduled.timestamp()!r}\\n".encode())
    finally:
        os.close(fd)


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("rec", rec)]
"""

PLUGINS = {"rec.py": REC}
# 40 jobs every 50 ms: 800 runs a second, so a kill lands among many groups in flight.
LOAD = "".join(f'[jobs.j{i}]\ntype = "rec"\nevery = "50ms"\n' for i in range(40))


def executed(rec: Path) -> list[tuple[str, str, float]]:
    out = []
    for line in rec.read_text().splitlines():
        run_id, job, scheduled = line.split()
        out.append((run_id, job, float(scheduled)))
    return out


def state(d: DaemonProc) -> Path:
    return d.dir / "state"


class TestKill9UnderLoad:
    """kill -9 while hundreds of runs a second are queued for the writer: after a restart,
    every run that started is in the history and no tick ran twice."""

    def test_no_run_lost_or_doubled(self, daemon_factory, tmp_path: Path) -> None:
        rec = tmp_path / "runs.txt"
        env = {"REC_FILE": str(rec)}
        rng = random.Random()
        waits = []
        for _ in range(3):
            d = daemon_factory(LOAD, PLUGINS, env=env).start()
            d.wait_for("run", count=100, timeout=20)
            waits.append(round(rng.uniform(0.0, 0.2), 3))
            time.sleep(waits[-1])  # anywhere inside a group, a commit or a checkpoint
            d.kill()
        d = daemon_factory(LOAD, PLUGINS, env=env).start()
        d.wait_for("run", count=100, timeout=20)
        assert d.stop() == 0
        runs = executed(rec)
        assert len(runs) > 400, len(runs)
        doubled = [k for k, n in Counter((job, s) for _, job, s in runs).items() if n > 1]
        assert doubled == [], (doubled[:5], waits)
        rows = {r["run_id"]: r for r in d.history()}
        lost = [run_id for run_id, _, _ in runs if run_id not in rows]
        assert lost == [], (lost[:5], waits)
        ran = {run_id for run_id, _, _ in runs}
        # A row whose run never got to the job's code can only be one the kill caught.
        phantom = [r for r in rows.values() if r["run_id"] not in ran]
        assert all(r["outcome"] == "interrupted" for r in phantom), phantom[:5]
        assert {r["outcome"] for r in rows.values()} <= {"succeeded", "interrupted"}


class TestReadsAfterARun:
    """What the daemon logged as run is what ``taskd history`` shows next."""

    def test_history_right_after_the_run_line(self, daemon_factory, tmp_path: Path) -> None:
        config = '[jobs.once]\ntype = "rec"\non = "startup"\n'
        d = daemon_factory(config, PLUGINS, env={"REC_FILE": str(tmp_path / "r")}).start()
        run = d.wait_for("run", job="once", timeout=10)[0]
        result = run_cli("history", "--json", "-c", str(d.config_path))
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        assert [(r["run_id"], r["outcome"]) for r in rows] == [(run["run_id"], "succeeded")]
        assert d.stop() == 0


class TestCleanStop:
    """A stop commits everything and checkpoints: the -wal and the journal are empty."""

    def test_stop_leaves_no_wal(self, daemon_factory, tmp_path: Path) -> None:
        rec = tmp_path / "runs.txt"
        d = daemon_factory(LOAD, PLUGINS, env={"REC_FILE": str(rec)}).start()
        d.wait_for("run", count=200, timeout=20)
        assert d.stop() == 0
        wal = state(d) / "state.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0
        for name in ("ticks.journal", "ticks.journal.1"):
            assert (state(d) / name).read_bytes() == b"", name
        rows = {r["run_id"] for r in d.history()}
        assert {run_id for run_id, _, _ in executed(rec)} <= rows


ENDS = """
import taskd


async def ok(ctx) -> dict:
    return {"run": ctx.run_id}


async def bad(ctx) -> None:
    raise RuntimeError("no luck for " + ctx.run_id)


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("ok", ok), taskd.JobType("bad", bad)]
"""
# 40 jobs every 50 ms (800 runs a second): the writer groups, so a kill right after a run's
# line finds its end not yet committed.
ENDS_LOAD = "".join(
    f'[jobs.e{i}]\ntype = "{"ok" if i % 2 else "bad"}"\nevery = "50ms"\n' for i in range(40)
)


class TestKill9AfterRunsEnded:
    """A run's end is on record once its ``run`` line is out: after kill -9 and a restart,
    ``taskd history`` shows how it ended, not ``interrupted``."""

    def test_logged_outcomes_survive_the_kill(self, daemon_factory) -> None:
        logged: dict[str, str] = {}
        for _ in range(3):
            d = daemon_factory(ENDS_LOAD, {"ends.py": ENDS}).start()
            d.wait_for("run", count=200, timeout=20)
            d.kill()  # right after: the last group of ends is not committed yet
            logged.update({e["run_id"]: e["outcome"] for e in d.events("run")})
        d = daemon_factory(ENDS_LOAD, {"ends.py": ENDS}).start()
        d.wait_for("run", count=1, timeout=20)
        assert d.stop() == 0
        rows = {r["run_id"]: r for r in d.history()}
        wrong = {
            run_id: (outcome, rows.get(run_id, {}).get("outcome"))
            for run_id, outcome in logged.items()
            if rows.get(run_id, {}).get("outcome") != outcome
        }
        assert wrong == {}, list(wrong.items())[:5]
        assert {"succeeded", "failed"} <= set(logged.values())
        failed = [r for r in rows.values() if r["run_id"] in logged and r["outcome"] == "failed"]
        assert all(r["error"] and r["run_id"] in r["error"] for r in failed), failed[:3]
