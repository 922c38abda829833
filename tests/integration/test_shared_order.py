"""Shared state: a job's result under its name is the result of its run that ENDED last,
whatever another job does with ``ctx.state``'s lock meanwhile, in memory and after a restart."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest

from tests.helpers import DaemonProc, run_cli

pytestmark = pytest.mark.timeout(240)

# ``racer`` runs twice per round: run A ends while ``holder`` holds the lock, run B ends
# right around the moment the holder lets go (``hops`` loop steps before the release; the
# test sweeps it so that B's end lands in each loop iteration around the release).
RACE = """
import asyncio

import taskd

runs: dict[str, int] = {}
held: dict[str, asyncio.Event] = {}
b_started: dict[str, asyncio.Event] = {}
gate: dict[str, asyncio.Event] = {}


def ev(table, key):
    return table.setdefault(key, asyncio.Event())


async def racer(ctx, key: str):
    n = runs[key] = runs.get(key, 0) + 1
    if n == 1:
        await ev(held, key).wait()  # run A: end only once the holder has the lock
        return "A"
    ev(b_started, key).set()
    await ev(gate, key).wait()  # run B: end when the holder lets it
    return "B"


async def holder(ctx, key: str, hops: int):
    async with ctx.state.locked():
        ev(held, key).set()
        await ev(b_started, key).wait()  # A has ended meanwhile (its result is waiting)
        await asyncio.sleep(0.2)
        ev(gate, key).set()
        for _ in range(hops):
            await asyncio.sleep(0)


async def peek(ctx, keys: list):
    return {k: ctx.state.get(k) for k in keys}


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("racer", racer),
        taskd.JobType("holder", holder),
        taskd.JobType("peek", peek),
    ]
"""

HOPS = range(8)
# Only the test runs these jobs: their one tick is decades away.
FAR = "at = 2099-01-01T00:00:00Z\n"


def config() -> str:
    text = f'[jobs.peek]\ntype = "peek"\n{FAR}[jobs.peek.options]\nkeys = {json.dumps([f"r{k}" for k in HOPS])}\n'
    for k in HOPS:
        text += (
            f'[jobs.r{k}]\ntype = "racer"\n{FAR}overlap = "allow"\n'
            f'[jobs.r{k}.options]\nkey = "r{k}"\n'
            f'[jobs.h{k}]\ntype = "holder"\n{FAR}'
            f'[jobs.h{k}.options]\nkey = "r{k}"\nhops = {k}\n'
        )
    return text


def cli(d: DaemonProc, *args: str) -> str:
    result = run_cli(*args, "-c", str(d.config_path), timeout=60)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def ended(d: DaemonProc, job: str, n: int) -> list[dict[str, Any]]:
    return d.wait_for("run", job=job, count=n, timeout=30)


def stored_shared(d: DaemonProc) -> dict[str, Any]:
    with contextlib.closing(d.db()) as db:
        rows = db.execute("SELECT key, value FROM shared").fetchall()
    return {k: json.loads(v) for k, v in rows}


class TestLastEndWins:
    """The run that ended last leaves its result, though an older one waited for the lock."""

    def test_newer_result_is_never_overwritten(self, daemon_factory) -> None:
        d = daemon_factory(config(), {"race.py": RACE}).start()
        for k in HOPS:
            cli(d, "trigger", f"r{k}")  # run A: waits for the holder's lock
            cli(d, "trigger", f"h{k}")
            (a,) = ended(d, f"r{k}", 1)
            assert a["result"] == "A"
            cli(d, "trigger", f"r{k}")  # run B
            ended(d, f"h{k}", 1)
            runs = ended(d, f"r{k}", 2)
            assert [r["result"] for r in runs] == ["A", "B"], runs
        out = json.loads(cli(d, "trigger", "peek", "--wait", "--json"))
        memory = out["result"]
        assert memory == {f"r{k}": "B" for k in HOPS}, memory
        assert d.stop() == 0
        assert {k: v for k, v in stored_shared(d).items() if k in memory} == memory
        again = daemon_factory(config(), {"race.py": RACE}, name="d").start()
        out = json.loads(cli(again, "trigger", "peek", "--wait", "--json"))
        assert out["result"] == memory
        assert again.stop() == 0
