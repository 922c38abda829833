"""taskd's process pool against a bare ProcessPoolExecutor, side by side in one run.

    .venv/bin/python bench/procpool.py [--calls 20000] [--workers 2] [--repeat 5]

Two workloads: trivial calls (the pool's own overhead per call) and CPU-bound calls (hashing
1 MiB 20 times, ~10 ms each: what cpu jobs look like). Each variant is run --repeat times,
interleaved so machine noise hits all of them alike; the table shows medians and the ratio of
throughput to the bare executor (higher is better). Prints one table; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskd.run.pool import ProcessPool

BLOCK = b"x" * (1 << 20)


def trivial(x: int) -> int:
    return x


def burn(x: int) -> str:
    digest = b""
    for _ in range(20):
        digest = hashlib.sha256(BLOCK + digest).digest()
    return digest.hex()[:8]


async def bare(func: Callable[[int], object], calls: int, workers: int) -> float:
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        await asyncio.gather(*(loop.run_in_executor(ex, func, i) for i in range(workers * 4)))
        start = time.perf_counter()
        await asyncio.gather(*(loop.run_in_executor(ex, func, i) for i in range(calls)))
        return time.perf_counter() - start


async def taskd_pool(func: Callable[[int], object], calls: int, workers: int) -> float:
    async with ProcessPool(workers) as pool:
        await asyncio.gather(*(pool.run(func, (i,)) for i in range(workers * 4)))
        start = time.perf_counter()
        await asyncio.gather(*(pool.run(func, (i,)) for i in range(calls)))
        return time.perf_counter() - start


def on_uvloop(coro: Awaitable[float]) -> float:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20000, help="trivial calls per round")
    parser.add_argument("--cpu-calls", type=int, default=400, help="CPU-bound calls per round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    workloads = [("trivial", trivial, args.calls), ("cpu ~10ms", burn, args.cpu_calls)]
    variants = [("ProcessPoolExecutor", bare), ("taskd ProcessPool", taskd_pool)]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for wname, func, calls in workloads:
            for vname, fn in variants:
                times.setdefault((wname, vname), []).append(
                    on_uvloop(fn(func, calls, args.workers))
                )
    print(f"process pool, {args.workers} workers, uvloop, median of {args.repeat} (interleaved)")
    print(
        f"{'workload':<11} {'pool':<21} {'calls':>6} {'median s':>9} {'calls/s':>9} {'vs bare':>8}"
    )
    for wname, _, calls in workloads:
        base = statistics.median(times[(wname, "ProcessPoolExecutor")])
        for vname, _ in variants:
            med = statistics.median(times[(wname, vname)])
            print(
                f"{wname:<11} {vname:<21} {calls:>6} {med:>9.3f} {calls / med:>9.0f} {base / med:>7.2f}x"
            )


if __name__ == "__main__":
    main()
