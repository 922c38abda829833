"""History retention: what it costs a commit at steady state, and how a backlog drains.

    .venv/bin/python bench/retention.py [--history 100000] [--commits 5000]
        [--excess 1000000] [--result 1]

1. One run committed at a time into a ``--history``-row history: flush() time with nothing to
   prune (the limit far away) and at the limit (each commit deletes the oldest row); the
   p99 is SQLite's WAL checkpoint, which the commit that crosses 1,000 pages pays.
2. ``--excess`` rows past a lowered limit (results of ``--result`` bytes), deleted by the
   store's passes on a running loop: rows and time per pass (each holds the loop), the
   longest, and the time to drain.

Prints a table; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from taskd.state.retention import PASS_PAUSE, Pruned, Retention
from taskd.state.store import StateStore

INSERT = (
    "INSERT INTO runs (run_id, job, scheduled, started, attempts, duration, outcome, error, "
    "trigger, result) VALUES (?, 'tick', ?, ?, 1, 0.01, 'succeeded', NULL, 'schedule', ?)"
)


def _store(tmp: str, rows: int, result: str, limit: int) -> StateStore:
    store = StateStore(Path(tmp) / "state" / "state.db", Retention(max_runs=limit))
    store.open()
    now = time.time()
    db = store.db
    db.execute("BEGIN")
    db.executemany(
        INSERT, ((f"pre{i:09d}", now - rows + i, now - rows + i, result) for i in range(rows))
    )
    db.execute("COMMIT")
    store.close()
    store.open()
    return store


async def steady(history: int, commits: int, result_bytes: int) -> None:
    result = '"' + "x" * result_bytes + '"'
    print(
        f"one run per commit into {history:,} rows of {result_bytes} B results "
        f"({commits:,} commits):"
    )
    for label, limit in (("nothing to prune", 10**9), ("at the limit", history)):
        with tempfile.TemporaryDirectory() as tmp:
            store = _store(tmp, history, result, limit)
            now = time.time()
            times = []
            for i in range(commits):
                t = now + i
                # On a loop the write waits for the next iteration's commit, timed here.
                store.run_finished(
                    f"r{i}", "tick", t, t, 1, 0.01, "succeeded", None, "schedule", result
                )
                begin = time.perf_counter()
                store.flush()
                times.append(time.perf_counter() - begin)
            store.close()
        times.sort()
        print(
            f"  {label:17} median {statistics.median(times) * 1e6:6.1f} us  "
            f"mean {statistics.mean(times) * 1e6:6.1f} us  "
            f"p99 {times[int(len(times) * 0.99)] * 1e6:7.1f} us  max {times[-1] * 1e3:5.2f} ms"
        )


async def drain(excess: int, result_bytes: int) -> None:
    result = '"' + "x" * result_bytes + '"'
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(tmp, excess, result, 10**9)
        passes: list[tuple[float, int]] = []
        run_pass = store._prune_pass
        drained = asyncio.Event()

        def timed() -> tuple[int, Pruned]:
            begin = time.perf_counter()
            before, done = run_pass()
            passes.append((time.perf_counter() - begin, before - done.count))
            if not done.more:
                drained.set()
            return before, done

        store._backlog._run_pass = timed
        begin = time.monotonic()
        store.retention = Retention(max_runs=10)
        await drained.wait()
        took = time.monotonic() - begin
        store.close()
    durations = sorted(p for p, _ in passes)
    rows = statistics.median(n for _, n in passes)
    print(
        f"drain {excess:,} rows of {result_bytes} B results: {len(passes)} passes "
        f"({PASS_PAUSE * 1e3:.0f} ms apart) in {took:.1f} s; per pass {rows:.0f} rows, "
        f"median {statistics.median(durations) * 1e3:.2f} ms, "
        f"p99 {durations[int(len(durations) * 0.99)] * 1e3:.2f} ms, "
        f"max {durations[-1] * 1e3:.2f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--history", type=int, default=100_000)
    ap.add_argument("--commits", type=int, default=5000)
    ap.add_argument("--excess", type=int, default=1_000_000)
    ap.add_argument("--result", type=int, default=1)
    args = ap.parse_args()
    asyncio.run(steady(args.history, args.commits, args.result))
    asyncio.run(drain(args.excess, args.result))


if __name__ == "__main__":
    main()
