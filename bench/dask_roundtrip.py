"""A trivial cpu run through the ``process`` executor (taskd's own pool) and through
``dask`` with ``scheduler = "local"`` (a 2-worker LocalCluster in taskd's helper process),
side by side in one run: the whole run path (runner.execute, the executor, the result
encoded where it ran, the sinks with the log line to /dev/null), no daemon around it.

    .venv/bin/python bench/dask_roundtrip.py [--runs 300] [--batch 200] [--repeat 3]

Runs go through the test kit (taskd.testing.JobRunner.run: execute() and its end's
bookkeeping). Round trip: runs one after another, each timed to its end (p50 and p99).
Runs/s: --batch runs started at once, as when that many jobs fall due together. The job is
a drop-in file's function, as users' are (dask gets it by value). Each variant is measured
--repeat times, interleaved; the table shows the medians and, for p50 and runs/s, the
min-max over the repeats. Prints one table; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskd import log as logsetup
from taskd.testing import JobRunner

PLUGIN = """
import taskd

def trivial() -> int:
    return 1

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("trivial", trivial, kind="cpu")]
"""


async def measure(file: Path, executor: str, runs: int, batch: int) -> tuple[list[float], float]:
    """(each sequential run's round trip in seconds, runs per second in batches)."""
    tables = {"dask": {"scheduler": "local", "workers": 2}}
    async with JobRunner(file, process_workers=2, executor_tables=tables) as kit:

        async def one() -> None:
            report = await kit.run("trivial", executor=executor)
            assert report.outcome == "succeeded", report.error

        await asyncio.gather(*(one() for _ in range(20)))  # started, workers warm
        trips = []
        for _ in range(runs):
            t0 = time.perf_counter()
            await one()
            trips.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        done = 0
        while done < runs:
            n = min(batch, runs - done)
            await asyncio.gather(*(one() for _ in range(n)))
            done += n
        rate = runs / (time.perf_counter() - t0)
    return trips, rate


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {"process": [], "dask": []}
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as sink:
        folder = Path(tmp)
        folder.chmod(0o755)
        (folder / "trivial.py").write_text(PLUGIN)
        logsetup.configure("error", "json", sink)
        for _ in range(args.repeat):
            for executor in results:
                trips, rate = uvloop.run(
                    measure(folder / "trivial.py", executor, args.runs, args.batch)
                )
                results[executor].append((_p(trips, 0.5), _p(trips, 0.99), rate))
    print(
        f"trivial cpu run, {args.runs} runs, batches of {args.batch}, medians of "
        f"{args.repeat} (min-max)"
    )
    print(f"{'executor':<10} {'p50 round trip':>24} {'p99 round trip':>15} {'runs/s':>22}")
    for executor, rows in results.items():
        p50 = [r[0] * 1e3 for r in rows]
        p99 = [r[1] * 1e3 for r in rows]
        rate = [r[2] for r in rows]
        print(
            f"{executor:<10} {_fmt(p50, 'ms', 2):>24} {statistics.median(p99):>12.2f} ms "
            f"{_fmt(rate, '', 0):>22}"
        )


def _fmt(values: list[float], unit: str, digits: int) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


if __name__ == "__main__":
    main()
