"""cpu job types for tests/integration/test_dask.py, loaded as a drop-in (so they reach the
dask workers by value, as users' drop-ins do)."""

import os
import signal
import time

import taskd


def where() -> dict:
    """Where the run ran: its process, and that process's session."""
    return {"pid": os.getpid(), "sid": os.getsid(0)}


def slow(pidfile: str, seconds: float = 30.0) -> int:
    with open(pidfile, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def die_once(marker: str) -> str:
    """SIGKILL its own worker the first time; succeed once the marker exists."""
    if not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("where", where, kind="cpu"),
        taskd.JobType("slow", slow, kind="cpu"),
        taskd.JobType("die_once", die_once, kind="cpu"),
    ]
