"""The stop: drain runs up to shutdown_timeout, a second signal forces, then one deadline."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from taskd.daemon.start import EXIT_OK

if TYPE_CHECKING:
    from taskd.daemon.serve import Daemon

log = structlog.get_logger("taskd.daemon")

FORCE_GRACE = 6.0  # after cancelling runs, how long to let them unwind (command: 5 s kill grace)


async def shutdown(daemon: Daemon) -> int:
    assert daemon.loaded is not None and daemon.rt is not None and daemon.jobset is not None
    daemon._stopping = True
    d = daemon.loaded.config.daemon
    daemon.stop_by = time.monotonic() + d.shutdown_timeout + FORCE_GRACE
    daemon.rt.stopping = True  # a run that fails now is not retried: there is no later
    daemon.notifier.stopping("stopping: draining runs")
    # The control socket stays open through the drain: status shows what is draining and
    # a `trigger --wait` learns its run's outcome; every command that would start or
    # change something is refused from now on (see control/commands.py). It closes in
    # serve()'s finally, before the store.
    if daemon.reloader is not None:
        daemon.reloader.close()
    jobs = daemon.jobset
    runs = jobs.stop()
    if daemon.fleet is not None:
        daemon.fleet.drain()  # no takeovers now; runs the drain cancels go back to the fleet
    # The stopping hooks run alongside the drain, not before it: their time must not come
    # out of the drain's (systemd's TimeoutStopSec covers both).
    stopping_hooks = asyncio.ensure_future(daemon.loaded.host.daemon_stopping(daemon._info()))
    forced = False
    if runs:
        log.info(
            "draining",
            runs=len(runs),
            jobs=sorted({j.name for j in jobs.everyone() if j.active}),
            timeout=d.shutdown_timeout,
        )
        drained = asyncio.ensure_future(asyncio.wait(runs, timeout=d.shutdown_timeout))
        second = asyncio.ensure_future(daemon._next_stop_signal())
        done, _ = await asyncio.wait({drained, second}, return_when=asyncio.FIRST_COMPLETED)
        if second in done:
            forced = True
            log.warning("forced_stop", hint="second signal: cancelling runs now")
        else:
            second.cancel()
        drained.cancel()
    left = [t for t in runs if not t.done()]
    if left:
        log.warning(
            "cancelling_runs",
            runs=len(left),
            reason="forced stop" if forced else "shutdown_timeout passed",
        )
    # From here on one deadline covers everything (cancelled runs unwinding, job tasks,
    # the stopping hooks), so the stop stays inside systemd's TimeoutStopSec.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FORCE_GRACE

    def remaining() -> float:
        return max(deadline - loop.time(), 0.0)

    if left:
        jobs.cancel_runs("daemon stopping")
        await daemon.rt.close(kill=True)
        await asyncio.wait(left, timeout=remaining())
    else:
        await daemon.rt.close(kill=False, timeout=remaining())
    tasks = jobs.tasks()
    for task in tasks:
        if task not in left:  # an inline run's task was cancelled above already
            task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=remaining())
    await asyncio.wait([stopping_hooks], timeout=remaining() or 0.001)
    await daemon.rt.settle()  # the last runs' log lines and history rows, before the store closes
    if daemon.fleet is not None:
        # The last finishes written (each until its claim's deadline, within the stop's).
        await daemon.fleet.close(timeout=remaining() or 0.001)
    await daemon.loaded.host.drain_hooks()
    stuck = daemon.rt.threads.stuck_count
    log.info(
        "stopped",
        forced=forced,
        stuck_threads=stuck,
        uptime=round(time.time() - daemon.started_at, 3),
    )
    return EXIT_OK
