"""The blocking pool (taskd.run.threadpool): what a stuck thread costs, how fast calls go
through it compared with concurrent.futures.ThreadPoolExecutor, and how soon the extra
threads leave once the hung calls return.

    .venv/bin/python bench/threads.py [--stuck 64] [--calls 20000]

Prints one table; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import structlog

from taskd.run.executors import ThreadRunner, with_timeout


def rss_and_vms() -> tuple[int, int]:
    info = psutil.Process(os.getpid()).memory_info()
    return info.rss, info.vms


def stuck_cost(stuck: int) -> tuple[float, float, float]:
    """(RSS KiB, VMS KiB per stuck thread, seconds until the pool is back to its workers)."""
    runner = ThreadRunner(2, stuck + 2)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def hang() -> None:
        entered.release()
        release.wait()

    def pile_up() -> None:
        # As a run's timeout does it: the call has started, and its caller gives up on it.
        for i in range(stuck):
            work = runner.pool.submit(hang, f"hang {i}")
            entered.acquire()
            runner.pool.give_up(work)

    rss0, vms0 = rss_and_vms()
    pile_up()
    rss1, vms1 = rss_and_vms()
    began = time.perf_counter()
    release.set()
    while runner.status().alive > 2:
        time.sleep(0.0005)
    back = time.perf_counter() - began
    runner.shutdown()
    return (rss1 - rss0) / stuck / 1024, (vms1 - vms0) / stuck / 1024, back


async def throughput(make: str, calls: int, workers: int) -> float:
    """Microseconds per awaited call (submit, run a no-op, result back on the loop)."""
    if make == "taskd":
        runner = ThreadRunner(workers)

        async def one() -> None:
            await runner.run(int, {}, 10.0, "noop")

    else:
        pool = ThreadPoolExecutor(workers)

        async def one() -> None:
            # What ThreadRunner.run did before it had its own pool.
            cfut = pool.submit(functools.partial(int))
            await with_timeout(asyncio.wrap_future(cfut), 10.0, "noop")

    began = time.perf_counter()
    batch = 50  # a few runs in flight at once, as when several blocking ticks coincide
    for _ in range(calls // batch):
        await asyncio.gather(*(one() for _ in range(batch)))
    took = time.perf_counter() - began
    if make == "taskd":
        runner.shutdown()
    else:
        pool.shutdown()
    return took / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stuck", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    # The pool logs each stuck thread: keep the table readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    rss, vms, back = stuck_cost(args.stuck)
    rows = [
        (f"RSS per stuck thread ({args.stuck} stuck)", f"{rss:.0f} KiB"),
        (f"virtual memory per stuck thread ({args.stuck} stuck)", f"{vms:.0f} KiB"),
        (f"back to 2 threads after {args.stuck} hung calls return", f"{back * 1000:.1f} ms"),
    ]
    for make in ("taskd", "ThreadPoolExecutor"):
        best = min(asyncio.run(throughput(make, args.calls, 8)) for _ in range(3))
        rows.append((f"awaited no-op call, {make} (best of 3)", f"{best:.1f} us"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
