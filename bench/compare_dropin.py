"""The taskd side of bench/compare.py: a drop-in plugin copied into the daemon's plugin folder.

`bench_record` (io) records its own lateness: the job name, the tick it belongs to
(`ctx.scheduled`) and when it started, appended to three lists: about a microsecond per run,
as the APScheduler and naive workers pay for theirs. The lists are written to the file named
by $TASKD_BENCH_OUT when the daemon begins to stop (a reload reuses this module, so they
survive a SIGHUP). `bench_cpu` is the trivial `cpu` job: it does nothing in a pool worker."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import taskd

_JOB: list[str] = []
_SCHEDULED: list[float] = []
_STARTED: list[float] = []


async def bench_record(ctx: taskd.JobContext) -> None:
    started = time.time()
    _JOB.append(ctx.job)
    _SCHEDULED.append(ctx.scheduled.timestamp())
    _STARTED.append(started)


def bench_cpu() -> None:
    return None


@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [
        taskd.JobType("bench_record", bench_record),
        taskd.JobType("bench_cpu", bench_cpu, kind="cpu"),
    ]


@taskd.hookimpl
def taskd_daemon_stopping(info: dict[str, Any]) -> None:
    out = os.environ.get("TASKD_BENCH_OUT")
    if out:
        jobs = [int(name[1:]) for name in _JOB]  # "j17" -> 17, as the other workers number them
        with open(out, "w") as f:
            json.dump({"job": jobs, "scheduled": _SCHEDULED, "started": _STARTED}, f)
