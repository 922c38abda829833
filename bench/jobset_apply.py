"""JobSet.apply on a reload that changes nothing: the CPU time it holds the loop.

    PYTHONPATH=. .venv/bin/python bench/jobset_apply.py [--jobs 10000] [--reps 9] [--compare]

Starts N `every` jobs in-process (no store, no daemon), then applies N fresh but equal specs
(as a reload of an unchanged file builds them) --reps times. Prints one line: the median,
min and max CPU milliseconds (thread_time) of one apply. Asserts only that nothing changed.
With --compare, JobSet.compare (the reload's sliced, read-only pass) runs first, untimed, as
the daemon's reload does: the figure is then the piece apply still holds the loop."""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from typing import Any

import structlog

from taskd.config.model import JobConfig
from taskd.config.steps import finish
from taskd.jobspec import JobSpec, make_trigger
from taskd.plugin.jobtype import JobType
from taskd.plugin.manager import PluginHost
from taskd.run.runtime import Runtime
from taskd.schedule.jobset import JobSet
from taskd.state.shared import SharedState


async def job(ctx: Any) -> None:
    return None


JOBTYPE = JobType("t", job)


def specs(n: int) -> dict[str, JobSpec]:
    out = {}
    for i in range(n):
        cfg = JobConfig(
            name=f"job{i}",
            type="t",
            schedule="every",
            every=3600.0,
            offset=float(i % 3600),
            timeout=30.0,
            options={"url": f"http://x/{i}"},
        )
        out[cfg.name] = JobSpec(cfg, JOBTYPE, make_trigger(cfg))
    return out


async def measure(n: int, reps: int, compare: bool) -> list[float]:
    rt = Runtime(shared=SharedState(), host=PluginHost(), thread_workers=2, process_workers=1)
    jobs = JobSet(rt)
    jobs.apply(specs(n), {})
    await asyncio.sleep(0.05)
    gc.collect()
    gc.freeze()  # as the daemon does after its start
    times = []
    for _ in range(reps):
        new = specs(n)
        if compare:
            finish(jobs.compare(new))
        t0 = time.thread_time()
        diff = jobs.apply(new, {})
        times.append((time.thread_time() - t0) * 1000)
        assert not (diff.added or diff.changed or diff.removed), diff
    for scheduled in jobs.everyone():
        scheduled.stop()
    for task in jobs.tasks():
        task.cancel()
    await asyncio.gather(*jobs.tasks(), return_exceptions=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--compare", action="store_true", help="JobSet.compare first")
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    times = asyncio.run(measure(args.jobs, args.reps, args.compare))
    print(
        f"apply, {args.jobs} unchanged jobs: median {statistics.median(times):.2f} ms CPU "
        f"(min {min(times):.2f}, max {max(times):.2f}, {args.reps} reloads)"
    )


if __name__ == "__main__":
    main()
