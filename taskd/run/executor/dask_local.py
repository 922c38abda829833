"""The helper process that owns ``[dask] scheduler = "local"``'s LocalCluster.

    python -m taskd.run.executor.dask_local --workers N --parent PID

The scheduler runs here, on this process's own loop, never on the daemon's: a busy
scheduler must not delay taskd's timers, and the daemon holds only a Client. The cluster
is N worker processes (each under a nanny, so one can be restarted alone), one thread each
(a run that must be stopped costs only its own worker), on loopback with no dashboard, and
``allowed-failures = 0`` (a task whose worker dies fails at once; taskd's retries decide).

Its life: it prints one JSON line, ``{"address": …}``, once the cluster is up, and closes
the cluster and exits when its stdin reaches EOF (the daemon closed it, or died: the pipe
is the lifeline) or on SIGTERM (sent by the kernel, PR_SET_PDEATHSIG, if the daemon dies
first). The daemon starts it in a session of its own, so a signal to the daemon's process
group (a terminal's Ctrl-C) does not reach the cluster, and at the stop ends whatever of
that session is left."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the daemon's thread that started us ends (best effort: Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl: nobody would signal us
        os.kill(os.getpid(), signal.SIGTERM)


async def _serve(workers: int) -> None:
    import dask

    # Before distributed is imported: its config is read at import.
    dask.config.set(
        {
            "distributed.scheduler.allowed-failures": 0,
            "distributed.logging.distributed": "warning",
        }
    )
    from distributed import LocalCluster

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        asynchronous=True,
    ) as cluster:
        print(json.dumps({"address": cluster.scheduler_address}), flush=True)
        # Watched by the loop, not read in a thread: a thread blocked on stdin at the
        # interpreter's exit (a SIGTERM came first) makes that exit abort.
        loop.add_reader(0, _lifeline, loop, stop)
        await stop.wait()
        loop.remove_reader(0)


def _lifeline(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """stdin is readable: at EOF (the daemon closed the pipe, or died) stop the cluster."""
    try:
        data = os.read(0, 65536)
    except OSError:
        data = b""
    if not data:
        loop.remove_reader(0)
        stop.set()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskd.run.executor.dask_local")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    asyncio.run(_serve(args.workers))


# Only as the program: the nannies spawn their workers with multiprocessing's "spawn",
# which imports this module again in each of them.
if __name__ == "__main__":
    main()
