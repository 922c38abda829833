"""Start-up: lock, store, control socket, runtime, metrics, the jobs, periodic timers.

Separate from the Daemon class so that serve.py reads as signals and the main loop."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from taskd.daemon.fleet import attach_fleet, open_fleet
from taskd.errors import StateError
from taskd.ledger import LocalLedger
from taskd.observe.loopwatch import LoopWatch
from taskd.reload import Loaded, Reloader
from taskd.run.runtime import Runtime
from taskd.schedule.jobset import JobSet
from taskd.schedule.timers import timers
from taskd.state.dbfile import describe
from taskd.state.lock import InstanceLock
from taskd.state.retention import Retention
from taskd.state.shared import SharedState
from taskd.state.store import StateStore

if TYPE_CHECKING:
    from taskd.config.model import DaemonConfig
    from taskd.daemon.serve import Daemon
    from taskd.jobspec import JobSpec

log = structlog.get_logger("taskd.daemon")

EXIT_OK = 0
EXIT_STATE = 3
CLOCK_CHECK = 10.0  # seconds between wall-clock step checks
CLOCK_STEP = 0.5  # a wall-clock jump larger than this re-times every job
# _in_thread wants a bound, a start has none of its own: a stop signal ends a slow load now,
# and under systemd TimeoutStartSec bounds it. A day is none, in effect.
START_LOAD_TIMEOUT = 86400.0


async def start(daemon: Daemon, loaded: Loaded) -> int:
    d = loaded.config.daemon
    daemon.lock = InstanceLock(d.state_dir)
    try:
        daemon.lock.acquire()
    except OSError as exc:  # StateError, or a full or failing disk writing the pid
        daemon.lock.release()
        daemon.lock = None
        error = str(exc) if isinstance(exc, StateError) else describe(exc, where=d.state_dir)
        log.error("cannot_start", error=error, state_dir=str(d.state_dir), **_trust_hint(loaded))
        return EXIT_STATE
    # The resolved state_dir the lock checked (taskd.state.files.prepare_dir): its every
    # folder is trusted, so what it names cannot be changed by another user meanwhile.
    daemon.store = StateStore(daemon.lock.path.parent / "state.db", _retention(d))
    try:
        daemon.store.open()
    except StateError as exc:
        daemon.store = None
        log.error("cannot_start", error=str(exc))
        return EXIT_STATE
    # The control socket comes after the lock (a live socket of this state_dir's daemon
    # can then not be ours to replace) and before READY=1 (a unit ordered after taskd may
    # use it at once).
    from taskd.control.commands import Commands
    from taskd.control.server import ControlServer

    commands = Commands(daemon)

    async def handle(cmd: str, args: dict[str, Any]) -> Any:
        if daemon.loopwatch is not None:
            daemon.loopwatch.poke()  # a command is work: an idle daemon's watch is parked
        return await commands.handle(cmd, args)

    control = ControlServer(d.runtime_dir / "control.sock", handle, group=d.control_group)
    try:
        await control.start()
    except (StateError, OSError) as exc:
        log.error("cannot_start", error=str(exc))
        return EXIT_STATE
    daemon.control = control
    shared = SharedState(daemon.store.shared())
    shared.add_listener(daemon.store.set_shared)
    rt = Runtime(
        shared=shared,
        ledger=LocalLedger(daemon.store),
        host=loaded.host,
        thread_workers=d.thread_workers,
        process_workers=d.process_workers,
        max_result_size=d.max_result_size,
        thread_workers_max=d.thread_workers_max,
        executor_tables=loaded.config.executor_tables,
    )
    daemon.rt = rt
    daemon.loaded = loaded
    if d.metrics_address:
        # Imported only when asked for: aiohttp and prometheus_client cost start-up time
        # and memory that a daemon without metrics should not pay. Before the pool warms,
        # so a bind failure leaves no forked workers behind.
        from taskd.observe.http import MetricsServer

        metrics = MetricsServer(d.metrics_address, daemon)
        try:
            await metrics.start()
        except StateError as exc:
            log.error("cannot_start", error=str(exc))
            return EXIT_STATE
        daemon.metrics = metrics
    if any(s.jobtype is not None and s.jobtype.kind == "cpu" for s in loaded.specs.values()):
        try:
            await rt.procs()  # warm, so the first cpu run does not pay for forking workers
        except Exception as exc:
            # io and blocking jobs must still run; cpu runs fail with the reason, and the
            # pool is tried again at the next cpu run.
            log.error(
                "procpool_unavailable",
                error=repr(exc),
                hint="cpu jobs will fail until worker processes can start",
            )
    warm_executors(rt, loaded.specs)
    # Fleet jobs claim their runs in the fleet's database: its ledger comes before the jobs
    # (they pick it by scope). Nothing of it is imported without a fleet job.
    daemon.fleet = await open_fleet(loaded, rt, daemon.store)
    rows = daemon.store.jobs()
    rt.stats.seed(rows)
    daemon.jobset = jobset = JobSet(rt)
    jobset.apply(loaded.specs, rows)
    attach_fleet(daemon.fleet, jobset)
    # Right after the jobs start (no await between): a startup run that blocks the loop
    # is already watched.
    daemon.loopwatch = _loop_watch(d.loop_block_threshold, daemon.jobset, rt)
    daemon.loopwatch.is_plugin_file = _plugin_files(loaded)
    daemon.reloader = Reloader(
        daemon.config_path,
        loaded,
        daemon._apply,
        before=daemon.notifier.reloading,
        after=daemon._reloaded,
        prepare=lambda new: jobset.compare(new.specs),
    )
    start_timers(daemon)
    daemon.notifier.ready(daemon._status_line())
    log.info(
        "started",
        pid=os.getpid(),
        config=str(loaded.config.path),
        jobs=len(daemon.jobset.jobs),
        broken=daemon.jobset.broken(),
        loop=daemon.loop_name,
        control=str(control.path),
    )
    # Everything made so far (config, plugins, one task per job) lives as long as the
    # daemon: move it out of the cyclic collector's way, so a full collection during a
    # burst of runs does not walk 10,000 jobs' worth of objects. After READY=1, with no
    # await between: the collection walks everything the start built (25 ms for 10,000
    # jobs), housekeeping that units ordered after taskd need not wait for; a run due at
    # once waits for it either way.
    gc.collect()
    gc.freeze()
    gc.enable()  # taskd run disabled it for the start (taskd.cli.main)
    await loaded.host.daemon_started(daemon._info())
    return EXIT_OK


def warm_executors(rt: Runtime, specs: Mapping[str, JobSpec]) -> None:
    """Start the executors jobs name (other than the built-ins), each in a task of its own:
    a cluster may take seconds to come up, which the start (READY=1) and the other jobs do
    not wait for. A run that comes first waits for it; one that fails is logged, and the next
    run tries again."""
    names = {s.executor for s in specs.values() if s.executor is not None}
    for name in sorted(names - set(rt.executors.live)):
        rt.spawn(_warm(rt, name))


async def _warm(rt: Runtime, name: str) -> None:
    try:
        await rt.executors.start(name)
    except Exception as exc:
        log.error(
            "executor_unavailable",
            executor=name,
            error=str(exc) or repr(exc),
            hint=f"runs of jobs with executor = {name!r} fail until it starts",
        )


def start_timers(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    interval = daemon.notifier.watchdog_interval
    if interval:
        # Pinged from a loop callback: if the loop is blocked, the pings stop and systemd
        # restarts us, which is the point.
        def ping() -> None:
            daemon.notifier.ping()
            daemon._timers["watchdog"] = loop.call_later(interval, ping)

        ping()
    offset = time.time() - loop.time()
    last_status = ""

    def clock_check() -> None:
        nonlocal offset, last_status
        now_offset = time.time() - loop.time()
        if abs(now_offset - offset) > CLOCK_STEP:
            log.warning("clock_stepped", by=round(now_offset - offset, 3))
            if daemon.jobset is not None:
                daemon.jobset.clock_changed()
        offset = now_offset
        status = daemon._status_line()
        if status != last_status:
            daemon.notifier.status(status)
            last_status = status
        daemon._timers["clock"] = loop.call_later(CLOCK_CHECK, clock_check)

    daemon._timers["clock"] = loop.call_later(CLOCK_CHECK, clock_check)


def _loop_watch(threshold: float, jobset: JobSet, rt: Runtime) -> LoopWatch:
    """Measure the loop's lag and name whatever blocks it (taskd.observe.loopwatch). The
    probe runs while runs are in flight and parks while the daemon is idle; the scheduler's
    timer, signals and requests arm it again."""

    def run_ids(job: str) -> list[str]:
        scheduled = jobset.jobs.get(job)
        return list(scheduled.active) if scheduled is not None else []

    stats = rt.stats
    watch = LoopWatch(threshold, run_ids)
    watch.busy = lambda: stats.running > 0
    watch.start(asyncio.get_running_loop())
    timers().beat = watch.beat
    return watch


def _plugin_files(loaded: Loaded) -> Callable[[str], bool]:
    """Whether a source file is a plugin's: under a plugin folder, or the module (or package)
    of an installed plugin. For the blocked-loop report, which names plugin frames first."""
    roots = [str(p) + os.sep for p in loaded.config.daemon.plugin_dirs]
    for record in loaded.host.records:
        module = sys.modules.get(record.module_name or "") or record.plugin
        path = getattr(module, "__file__", None)
        if path:
            is_package = os.path.basename(path) == "__init__.py"
            roots.append(os.path.dirname(path) + os.sep if is_package else path)
    prefixes = tuple(roots)
    return lambda filename: filename.startswith(prefixes)


def _retention(d: DaemonConfig) -> Retention:
    return Retention(d.history_max_runs, d.history_max_age)


def _trust_hint(loaded: Loaded) -> dict[str, str]:
    """For a start refused on state_dir: one command for it and the refused plugin files and
    folders logged just before, when they share a fix under one folder (a checkout made
    under umask 002)."""
    from taskd.trust_report import combined_hints, survey

    hints = combined_hints(survey(loaded.config.path, loaded.config.daemon))
    return {"hint": "; ".join(hints)} if hints else {}
