"""What the dask executor does with a task it gave up on (its run timed out or was
cancelled). Dask cannot stop a running task: cancelling it releases its key while the
worker's thread runs on. So, on the local cluster taskd owns, the worker whose thread runs
it is killed (one thread per worker: only that run is lost; its nanny starts a new one),
and only that worker: the scheduler's processing lists also name the tasks a worker only
holds in its queue, and those are not running. A remote cluster's workers are shared: left
alone, and the task counted as orphaned if it was running."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping
from typing import Any

import structlog

log = structlog.get_logger("taskd.dask")

PROBE_TIMEOUT = 5.0  # seconds to ask the workers holding a given-up task whether they run it
_KILLED_MAX = 256


class GiveUp:
    """Stops given-up tasks, and remembers what that cost."""

    def __init__(self) -> None:
        # Workers taskd killed, oldest first: a task that waited on one of them never
        # started, and its run sends it again rather than failing (DaskExecutor._send).
        self.killed: dict[str, None] = {}
        self.orphaned = 0  # tasks given up on that may still run (remote cluster)

    async def stop(self, client: Any, fut: Any, key: str, why: str, sid: int | None) -> None:
        """Cancel ``fut`` (task ``key``); with the local cluster (its helper's session
        ``sid``) kill the worker running it first, so nothing new is sent to that worker's
        busy thread."""
        try:
            processing: Mapping[str, Any] = await client.processing()
            holders = [w for w, keys in processing.items() if key in keys]
            running = await _running(client, key, holders) if holders else {}
            left: list[str] = []
            if running and sid is not None:
                log.info("dask_worker_restart", key=key, workers=sorted(running), reason=why)
                for worker, pid in running.items():
                    # Before the kill: a run whose task waited there sees this and resends.
                    self.killed[worker] = None
                    if len(self.killed) > _KILLED_MAX:
                        del self.killed[next(iter(self.killed))]
                    if pid is None or not _kill_worker(pid, sid):
                        left.append(worker)
            await client.cancel([fut], reason=why, force=True)
            if running and sid is None:
                self.orphaned += 1
                log.warning("dask_task_orphaned", key=key, workers=sorted(running), reason=why)
            if left:  # not killed by pid: the scheduler's restart (its nanny waits ~4 s)
                await client.restart_workers(left, raise_for_error=False)
        except Exception as exc:  # the cluster went away meanwhile: nothing left to stop
            from taskd.run.limits import describe

            log.warning("dask_give_up_failed", key=key, error=describe(exc, 500))


async def _running(client: Any, key: str, holders: list[str]) -> dict[str, int | None]:
    """Those of ``holders`` whose thread runs ``key`` now, with their pid (None: the worker
    did not say, so it may be)."""
    from taskd.run.executor import dask_call

    try:
        found = await asyncio.wait_for(
            client.run(dask_call.executing, key, workers=holders, on_error="return"),
            PROBE_TIMEOUT,
        )
    except (TimeoutError, OSError):
        found = {}
    running: dict[str, int | None] = {}
    for worker in holders:
        pid = found.get(worker, -1)
        if pid is not None:  # None: it answered that it is not running it
            running[worker] = pid if isinstance(pid, int) and pid > 0 else None
    return running


def _kill_worker(pid: int, sid: int) -> bool:
    """SIGKILL worker ``pid`` if it is still one of the local cluster's (session ``sid``):
    its nanny starts a new one at once. False if it is not (its pid was reused)."""
    try:
        if os.getsid(pid) != sid:
            return False
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # gone already
    return True
