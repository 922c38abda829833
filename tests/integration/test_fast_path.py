"""The scheduler's fused run path (JobSpec.fast: an ``every`` io job run inline, no timeout,
no retries) keeps every guarantee of the general path: the tick and the run's start are on
record before the job's code runs, a kill -9 during a run leaves it interrupted and its tick
not run again, and a reload that makes a job ineligible (or eligible again) switches paths at
its next run."""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from tests.helpers import DaemonProc

PLUGIN = """
import asyncio
import contextlib
import sqlite3

import taskd


def _on_record(job: str, run_id: str) -> dict:
    # What the journal (both files) and the committed database hold right now: a line may
    # be in either (the writer empties a journal file once its lines are committed).
    text = ""
    for name in ("state/ticks.journal", "state/ticks.journal.1"):
        with contextlib.suppress(FileNotFoundError), open(name) as f:
            text += f.read()
    lines = text.splitlines()
    with contextlib.closing(sqlite3.connect("file:state/state.db?mode=ro", uri=True)) as db:
        row = db.execute(
            "SELECT r.outcome, r.scheduled, j.last_tick FROM runs r JOIN jobs j "
            "ON j.name = r.job WHERE r.run_id = ?",
            (run_id,),
        ).fetchone()
    mine = [r for r in (x.split("\t") for x in lines) if r[0] == "R" and r[1:3] == [run_id, job]]
    if mine:
        run, scheduled = "journal", float(mine[0][3])
    elif row is not None and row[0] == "running":
        run, scheduled = "db", row[1]
    else:
        return {"run": None, "tick": False}
    ticks = [float(x.split("\t")[2]) for x in lines if x.startswith(f"T\t{job}\t")]
    if row is not None and row[2] is not None:
        ticks.append(row[2])
    return {"run": run, "tick": any(t >= scheduled for t in ticks)}


async def peek(ctx) -> dict:
    return _on_record(ctx.job, ctx.run_id)


async def nap(ctx, seconds: float = 0.0) -> str:
    ctx.log.info("nap_start")
    await asyncio.sleep(seconds)
    return "done"


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("peek", peek), taskd.JobType("nap", nap)]
"""

PLUGINS = {"fastpath.py": PLUGIN}


class TestOnRecordBeforeTheJob:
    """When the job's code starts, its tick and its start are on record (journal or DB)."""

    @pytest.mark.parametrize(
        "extra",
        [
            "",  # the fused path
            'timeout = "5s"',  # the general path, inline
            'overlap = "allow"',  # the general path, a task per run
        ],
    )
    def test_tick_and_start_recorded_first(self, daemon_factory, extra: str) -> None:
        config = f'[jobs.p]\ntype = "peek"\nevery = "50ms"\n{extra}\n'
        d = daemon_factory(config, PLUGINS).start()
        runs = d.wait_for("run", job="p", count=8, timeout=5)
        assert d.stop() == 0
        results = [r.get("result") for r in runs]
        assert all(
            r is not None and r["run"] in ("journal", "db") and r["tick"] for r in results
        ), results


class TestKillDuringARun:
    """kill -9 inside a fused-path run: interrupted after the restart, its tick not run again."""

    def test_interrupted_and_not_run_again(self, daemon_factory) -> None:
        config = '[jobs.n]\ntype = "nap"\nevery = "1s"\n[jobs.n.options]\nseconds = 30.0\n'
        d = daemon_factory(config, PLUGINS).start()
        run_id = d.wait_for("nap_start", job="n", timeout=5)[0]["run_id"]
        d.kill()
        again = daemon_factory(config, PLUGINS).start()  # the same directory and state
        assert again.wait_for("runs_interrupted", timeout=5)[0]["count"] == 1
        second = again.wait_for("nap_start", job="n", timeout=5)[0]["run_id"]
        assert again.stop() == 0
        rows = {r["run_id"]: r for r in again.history("n")}
        assert rows[run_id]["outcome"] == "interrupted"
        assert second in rows and second != run_id
        assert rows[second]["scheduled"] > rows[run_id]["scheduled"]
        assert Counter(r["scheduled"] for r in rows.values()).most_common(1)[0][1] == 1


class TestReloadSwitchesPaths:
    """A reload that adds a timeout takes the job off the fused path at its next run; one that
    removes it puts the job back; no run is lost or doubled across the switches."""

    def test_timeout_added_then_removed(self, daemon_factory) -> None:
        base = '[jobs.n]\ntype = "nap"\nevery = "200ms"\n{extra}\n[jobs.n.options]\nseconds = 0.1\n'
        d: DaemonProc = daemon_factory(base.format(extra=""), PLUGINS).start()
        d.wait_for("run", job="n", outcome="succeeded", count=2, timeout=5)
        _reload(d, base.format(extra='timeout = "20ms"'))
        timed_out = d.wait_for("run", job="n", outcome="timed_out", count=2, timeout=5)
        _reload(d, base.format(extra=""))
        have = len(d.events("run", job="n", outcome="succeeded"))
        d.wait_for("run", job="n", outcome="succeeded", count=have + 2, timeout=5)
        assert d.stop() == 0
        assert all(r["error"] for r in timed_out)
        rows = d.history("n")
        outcomes = [r["outcome"] for r in sorted(rows, key=lambda r: r["scheduled"])]
        # succeeded, then timed out, then succeeded again: each path in its turn.
        first_to = outcomes.index("timed_out")
        assert "succeeded" in outcomes[:first_to] and "succeeded" in outcomes[first_to:]
        assert Counter(r["scheduled"] for r in rows).most_common(1)[0][1] == 1
        assert len(rows) == len(d.events("run", job="n"))


def _reload(d: DaemonProc, config: str) -> None:
    before = len(d.events("reloaded"))
    d.write_config(config)
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while len(d.events("reloaded")) == before:
        assert time.monotonic() < deadline, "no reloaded line within 5 s"
        time.sleep(0.02)
