"""The other side of bench/compare.py: APScheduler 3 and the naive floor, each in a process.

    python bench/compare_workers.py ENGINE SPEC OUT

ENGINE: `aps-asyncio`, `aps-uvloop` (APScheduler's AsyncIOScheduler on either loop) or `naive`
(one asyncio Task per job sleeping to its next tick, on uvloop). SPEC is a JSON file
{"jobs": [[interval, phase], ...]}: an `every` job fires at phase + k * interval (epoch
seconds); interval 0 makes a one-shot at `phase`. Prints BENCH-READY once the jobs are
scheduled, runs until SIGTERM, then writes the runs it recorded to OUT as JSON lists
{"job", "scheduled", "started"} (the same the taskd drop-in writes).

Lateness: each run records time.time() minus its tick. APScheduler 3 does not hand a job its
scheduled time, so the APS job computes it from the trigger's grid, phase + floor((now -
phase) / interval) * interval: exact as long as a run starts less than one interval late,
which APS guarantees with its default misfire_grace_time of 1 s for the 1 s jobs here (a run
later than that is not run but logged as missed). `ppe ...` is the bare ProcessPoolExecutor
for the cpu case (bench/procpool.py's)."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys
import time
from datetime import UTC, datetime

JOB: list[int] = []
SCHEDULED: list[float] = []
STARTED: list[float] = []


async def aps_record(i: int, phase: float, interval: float) -> None:
    now = time.time()
    JOB.append(i)
    SCHEDULED.append(phase + math.floor((now - phase) / interval) * interval if interval else phase)
    STARTED.append(now)


async def naive_job(i: int, phase: float, interval: float) -> None:
    while True:
        now = time.time()
        if interval:
            tick = phase + (math.floor((now - phase) / interval) + 1) * interval
        elif now > phase + 1:
            return
        else:
            tick = phase
        # One sleep, as the simplest loop would: uvloop's timers have 1 ms resolution, so a
        # run may start up to ~1 ms early (sleeping again would spin: a delay under 1 ms is 0).
        await asyncio.sleep(tick - time.time())
        JOB.append(i)
        SCHEDULED.append(tick)
        STARTED.append(time.time())
        if not interval:
            return


async def _serve(engine: str, jobs: list[list[float]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = []
    sched = None
    if engine == "naive":
        tasks = [loop.create_task(naive_job(i, p, t)) for i, (t, p) in enumerate(jobs)]
    else:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.date import DateTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        sched = AsyncIOScheduler(event_loop=loop, timezone=UTC)
        for i, (t, p) in enumerate(jobs):
            start = datetime.fromtimestamp(p, UTC)
            trigger = IntervalTrigger(seconds=t, start_date=start) if t else DateTrigger(start)
            sched.add_job(aps_record, trigger, args=(i, p, t), id=str(i))
        sched.start()
    print("BENCH-READY", flush=True)
    await stop.wait()
    if sched is not None:
        sched.shutdown(wait=False)
    for task in tasks:
        task.cancel()


def main() -> None:
    engine, spec, out = sys.argv[1:4]
    if engine == "ppe":
        from procpool import bare, on_uvloop, trivial

        calls, workers = int(spec), int(out)
        print(json.dumps({"seconds": on_uvloop(bare(trivial, calls, workers))}), flush=True)
        return
    with open(spec) as f:
        jobs = json.load(f)["jobs"]
    if engine == "aps-asyncio":
        asyncio.run(_serve(engine, jobs))
    else:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(engine, jobs))
    with open(out, "w") as f:
        json.dump({"job": JOB, "scheduled": SCHEDULED, "started": STARTED}, f)


if __name__ == "__main__":
    main()
