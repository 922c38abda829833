"""CPU per run through the run path alone, in-process: execute() of a trivial io job and its
end (the sinks: stats, the ledger's store with its commit, shared state, the JSON `run` line
to /dev/null, hooks), with no scheduling and no daemon around it. Deterministic enough to compare commits.

    .venv/bin/python bench/runpath.py [--runs 4000] [--rounds 5] [--result none|small|medium]
        [--timeout SECONDS] [--bare] [--cpu [--batch 3000]]
    PYTHONPATH=/path/to/other/worktree .venv/bin/python bench/runpath.py   # another version

--timeout gives the job a timeout (the timer around each attempt); --bare leaves out the store
and the log line (NULL_LEDGER, log level "error"), so what remains is the runner and the
sinks' own work.

--cpu runs a trivial `cpu` job instead (returns None in a pool worker; 2 workers): --batch
runs are started at once, as when that many jobs fall due together, and the next batch
starts when they have all ended. Prints the daemon side's CPU per run (the workers' CPU is
not counted) and the runs per second (wall time: the workers and the machine's load count).

Prints the best of --rounds (CPU time per run, process_time); asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import uvloop

from taskd import log as logsetup
from taskd.config.model import JobConfig
from taskd.jobspec import JobSpec, make_trigger
from taskd.ledger import NULL_LEDGER, LocalLedger
from taskd.plugin.jobtype import JobType
from taskd.plugin.manager import PluginHost
from taskd.run import runner
from taskd.run.events import Cause
from taskd.run.runtime import Runtime
from taskd.state.shared import SharedState
from taskd.state.store import StateStore

# What the job returns: its encoding (measured against max_result_size) is on the run path.
RESULTS: dict[str, Any] = {
    "none": None,
    "small": {"ok": True, "status": 200, "latency": 0.0123, "url": "https://example.org/"},
    "medium": {"rows": [{"id": i, "name": f"row {i}", "value": i * 1.5} for i in range(100)]},
}


def cpu_trivial() -> None:
    """The trivial cpu job: a module-level function, so a pool worker can import it."""


def job_returning(value: Any) -> Any:
    async def trivial(ctx: Any) -> Any:
        return value

    return trivial


async def measure(
    runs: int,
    rounds: int,
    sink: TextIO,
    result: Any = None,
    timeout: float | None = None,
    bare: bool = False,
    batch: int = 0,
) -> tuple[float, float]:
    """(best CPU per run, runs per second in that round); ``batch`` > 0: the cpu job."""
    with tempfile.TemporaryDirectory() as tmp:
        logsetup.configure("error" if bare else "info", "json", sink)
        store = None if bare else StateStore(Path(tmp) / "state.db")
        if store is not None:
            store.open()
        ledger = NULL_LEDGER if store is None else LocalLedger(store)
        rt = Runtime(
            shared=SharedState(),
            ledger=ledger,
            host=PluginHost(),
            thread_workers=2,
            process_workers=2,
        )
        rt.refresh_log()
        cfg = JobConfig(name="j", type="t", schedule="every", every=1.0, timeout=timeout)
        jt = JobType("t", cpu_trivial, kind="cpu") if batch else JobType("t", job_returning(result))
        spec = JobSpec(cfg, jt, make_trigger(cfg))

        async def one() -> None:
            now = time.time()
            info = runner.RunInfo(rt.new_run_id(), "j", now, now, Cause.SCHEDULE)
            await runner.execute(rt, spec, info, ledger)

        if batch:
            await asyncio.gather(*(one() for _ in range(8)))  # the pool up, its workers warm
            await rt.settle()
        best, rate = float("inf"), 0.0
        for _ in range(rounds):
            t0, w0 = time.process_time(), time.perf_counter()
            if batch:
                for start in range(0, runs, batch):
                    await asyncio.gather(*(one() for _ in range(min(batch, runs - start))))
            else:
                for i in range(runs):
                    await one()
                    if i % 50 == 49:  # let the deferred ends and the batched commit happen
                        await asyncio.sleep(0)
                        await asyncio.sleep(0)
            await rt.settle()
            await asyncio.sleep(0)
            cpu = (time.process_time() - t0) / runs
            if cpu < best:
                best, rate = cpu, runs / (time.perf_counter() - w0)
        await rt.close(kill=False)
        if store is not None:
            store.close()
    return best, rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--result", choices=sorted(RESULTS), default="none")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--bare", action="store_true", help="no store, no log line")
    parser.add_argument("--cpu", action="store_true", help="a trivial cpu job instead")
    parser.add_argument("--batch", type=int, default=3000, help="cpu runs started at once")
    args = parser.parse_args()
    with open(os.devnull, "w") as sink:
        per_run, rate = uvloop.run(
            measure(
                args.runs,
                args.rounds,
                sink,
                RESULTS[args.result],
                args.timeout,
                args.bare,
                args.batch if args.cpu else 0,
            )
        )
    what = "execute + sinks" if args.bare else "execute + sinks + commit"
    timed = f", timeout {args.timeout:g}s" if args.timeout is not None else ""
    if args.cpu:
        print(
            f"cpu run path ({what}), batches of {args.batch}, best of {args.rounds}: "
            f"{per_run * 1e6:.2f} us daemon CPU per run, {rate:.0f} runs/s"
        )
        return
    print(
        f"run path ({what}), result {args.result}{timed}, best of {args.rounds}: "
        f"{per_run * 1e6:.2f} us"
    )


if __name__ == "__main__":
    main()
