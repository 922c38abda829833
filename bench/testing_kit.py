"""What the plugin author's kit costs a test: taskd.testing.JobRunner runs per kind.

    .venv/bin/python bench/testing_kit.py [--runs 200]

For each kind (io, blocking, cpu): the first run of a fresh runner (loading the plugin file,
and for cpu starting the forkserver and a worker) and the median of --runs later runs on
the same runner; then a whole one-shot `async with JobRunner(...)` for a cpu run (what a
`taskd_run` test pays once), and how long one `-o` takes to parse at its size limit.
Prints one table; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import structlog

from taskd.cli.overrides import MAX_OVERRIDE_CHARS, OverrideError, parse_override
from taskd.testing import JobRunner

PLUGIN = """
import taskd

async def io_job(ctx: taskd.JobContext, n: int = 1) -> int:
    return n

def blocking_job(n: int = 1) -> int:
    return n

def cpu_job(n: int = 1) -> int:
    return sum(range(n))

@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [
        taskd.JobType("io_job", io_job),
        taskd.JobType("blocking_job", blocking_job, kind="blocking"),
        taskd.JobType("cpu_job", cpu_job, kind="cpu"),
    ]
"""


async def per_kind(plugin: Path, runs: int) -> list[tuple[str, float, float]]:
    rows = []
    for kind in ("io", "blocking", "cpu"):
        async with JobRunner(plugin) as runner:
            t = time.perf_counter()
            first = await runner.run(f"{kind}_job")
            first_s = time.perf_counter() - t
            assert first.ok, first.error
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                await runner.run(f"{kind}_job", {"n": 10})
                times.append(time.perf_counter() - t)
        rows.append((kind, first_s, statistics.median(times)))
    return rows


async def one_shot(plugin: Path) -> float:
    t = time.perf_counter()
    async with JobRunner(plugin) as runner:
        await runner.run("cpu_job")
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # no run lines
    with tempfile.TemporaryDirectory() as tmp:
        plugin = Path(tmp) / "bench_plugin.py"
        plugin.write_text(PLUGIN)
        rows = asyncio.run(per_kind(plugin, args.runs))
        whole = asyncio.run(one_shot(plugin))
    print(f"{'kind':10s} {'first run':>12s} {'later runs (median)':>22s}")
    for kind, first, later in rows:
        print(f"{kind:10s} {first * 1e3:10.1f}ms {later * 1e3:20.2f}ms")
    print(f"one-shot JobRunner with a cpu run, open to close: {whole * 1e3:.0f} ms")
    text = "x={" + ".".join(["a"] * ((MAX_OVERRIDE_CHARS - 10) // 2)) + "=1}"
    t = time.perf_counter()
    with contextlib.suppress(OverrideError):  # refused for its depth, after the parse
        parse_override(text)
    print(
        f"-o at its {MAX_OVERRIDE_CHARS}-character limit, worst shape: "
        f"{(time.perf_counter() - t) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
