"""A burst: N jobs due at the same instant. How late does each run start?

    .venv/bin/python bench/burst.py [--jobs 10000] [--repeat 3]

Side by side in one run, each in a fresh process (so one cannot warm or litter the other):
- floor, inline: N bare asyncio tasks sleeping to one instant; the fastest a per-job Task
  design can be on this machine;
- floor, task per run: the same, each starting a child task at the instant (what taskd did
  before runs went inline);
- taskd: N real ScheduledJobs (one-shot `at` trigger, trivial io job) with the real runtime,
  state store and journal, logging to /dev/null.
Lateness = run start - scheduled instant; medians over --repeat rounds of first, p50, p99.
Prints one table; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - the log sink for the whole process


def _lateness(starts: list[float], due: float) -> dict[str, float]:
    late = sorted(s - due for s in starts)
    n = len(late)
    return {"first": late[0], "p50": late[n // 2], "p99": late[min(n - 1, int(n * 0.99))]}


async def _floor(n: int, child: bool) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    children: list[asyncio.Task[None]] = []
    due = float(int(time.time()) + 2)

    async def run() -> None:
        starts.append(time.time())

    async def job() -> None:
        fut = loop.create_future()
        loop.call_at(loop.time() + (due - time.time()) + 0.001, fut.set_result, None)
        await fut
        if child:
            children.append(loop.create_task(run()))
        else:
            starts.append(time.time())

    tasks = [loop.create_task(job()) for _ in range(n)]
    gc.collect()
    gc.freeze()
    while len(starts) < n:  # noqa: ASYNC110 - polling is the measurement's own business
        await asyncio.sleep(0.05)
    del tasks
    return _lateness(starts, due)


async def _taskd(n: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from taskd import log as logsetup
    from taskd.config.model import JobConfig
    from taskd.jobspec import JobSpec
    from taskd.ledger import LocalLedger
    from taskd.plugin.jobtype import JobType
    from taskd.plugin.manager import PluginHost
    from taskd.run.runtime import Runtime
    from taskd.schedule.job import ScheduledJob
    from taskd.schedule.triggers import At
    from taskd.state.shared import SharedState
    from taskd.state.store import StateStore

    logsetup.configure("info", "json", DEVNULL)
    starts: list[float] = []

    async def trivial(ctx: object) -> None:
        starts.append(time.time())

    store = StateStore(Path(tempfile.mkdtemp()) / "state.db")
    store.open()
    rt = Runtime(
        shared=SharedState(),
        ledger=LocalLedger(store),
        host=PluginHost(),
        thread_workers=2,
        process_workers=1,
    )
    jt = JobType("t", trivial)
    due = float(int(time.time()) + 2)
    for i in range(n):
        cfg = JobConfig(name=f"j{i}", type="t", schedule="at", at=due)
        ScheduledJob(JobSpec(cfg, jt, At(due)), rt, cursor=None).start()
    gc.collect()
    gc.freeze()  # as the daemon does after start-up
    while len(starts) < n:  # noqa: ASYNC110 - polling is the measurement's own business
        await asyncio.sleep(0.05)
    await rt.settle()
    store.close()
    return _lateness(starts, due)


def _child(kind: str, n: int) -> None:
    import uvloop

    coro = _taskd(n) if kind == "taskd" else _floor(n, child=(kind == "floor-task"))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(coro)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.jobs)
        return
    kinds = [
        ("floor-inline", "floor: a task per job, run inline"),
        ("floor-task", "floor: + a child task per run"),
        ("taskd", "taskd ScheduledJob + runtime"),
    ]
    results: dict[str, list[dict[str, float]]] = {k: [] for k, _ in kinds}
    for _ in range(args.repeat):
        for kind, _ in kinds:  # interleaved, so machine noise hits all alike
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--jobs", str(args.jobs)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[kind].append(json.loads(out.stdout))
    print(
        f"burst: {args.jobs} jobs due at one instant, uvloop, median of {args.repeat} rounds (ms late)"
    )
    print(f"{'variant':<34} {'first':>8} {'p50':>8} {'p99':>8}")
    for kind, label in kinds:
        med = {
            m: statistics.median(r[m] for r in results[kind]) * 1000
            for m in ("first", "p50", "p99")
        }
        print(f"{label:<34} {med['first']:>8.2f} {med['p50']:>8.1f} {med['p99']:>8.1f}")


if __name__ == "__main__":
    main()
