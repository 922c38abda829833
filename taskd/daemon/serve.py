"""The Daemon: signals, serve, reload; start-up is in start.py, the stop in stop.py.

Signal handlers only record the signal; the main loop acts on it (as uvicorn and gunicorn do).
Signals that arrive while starting are queued, not lost, and acted on once started."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from taskd import log as logsetup
from taskd.daemon.fleet import reload_fleet
from taskd.daemon.start import (
    EXIT_OK,
    EXIT_STATE,
    START_LOAD_TIMEOUT,
    _plugin_files,
    _retention,
    start,
    warm_executors,
)
from taskd.daemon.stop import shutdown
from taskd.errors import StateNotSaved
from taskd.observe.loopwatch import LoopWatch
from taskd.reload import Loaded, Reloader, ReloadResult, _in_thread, load_all
from taskd.run.runtime import Runtime
from taskd.schedule.jobset import Diff, JobSet
from taskd.state.lock import InstanceLock
from taskd.state.store import StateStore
from taskd.systemd import Notifier

if TYPE_CHECKING:
    from taskd.config.model import Config
    from taskd.control.server import ControlServer
    from taskd.fleet.ledger import FleetLedger
    from taskd.observe.http import MetricsServer

# Seconds the last commit waits for a full disk at the least, even when the stop's own time
# is spent (a drain that used all of shutdown_timeout): room may come from a log rotation.
STORE_WAIT_MIN = 2.0

log = structlog.get_logger("taskd.daemon")


class Daemon:
    """Signals, start, serve and stop. The job table is a JobSet, reloads are a Reloader and
    the control commands live in taskd.control.commands; this class wires them together."""

    def __init__(self, config_path: Path, *, notifier: Notifier | None = None) -> None:
        # Absolute once: a job that calls os.chdir must not break later reloads.
        self.config_path = config_path.absolute()
        # The config file as the caller already read and validated it (taskd run does, to
        # set up logging), so that the start does not read it again; dropped once used (the
        # daemon keeps the copy Loaded holds, without its key -> line map).
        self.start_config: Config | None = None
        # Unset: a job's subprocess must not be able to speak to systemd in our name.
        self.notifier = notifier or Notifier.from_env(unset_environment=True)
        self.loaded: Loaded | None = None
        self.rt: Runtime | None = None
        self.jobset: JobSet | None = None
        self.fleet: FleetLedger | None = None  # only with a fleet job (taskd.daemon.fleet)
        self.reloader: Reloader | None = None
        self.control: ControlServer | None = None
        self.loopwatch: LoopWatch | None = None
        self.metrics: MetricsServer | None = None
        self.store: StateStore | None = None
        self.lock: InstanceLock | None = None
        self.started_at = time.time()
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._early: list[int] = []
        self._stopping = False
        self._state_lost = False  # the stop's last commit failed: exit EXIT_STATE
        # time.monotonic() by which the stop promised to end (set when it starts): what is
        # left of it bounds the wait for a full disk at the last commit.
        self.stop_by: float | None = None
        # The pending handle of each periodic callback (watchdog ping, clock check), replaced on
        # every run, so a daemon up for months holds two handles, not millions.
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- entry -----------------------------------------------------------------------------

    def install_early_signal_handlers(self, received: list[int] | None = None) -> None:
        """Before the loop exists: record signals instead of dying on them. ``received`` is
        the list that the entry point's own early handlers record into (taskd.cli installs
        them before its imports): it becomes this daemon's, so none of those is lost."""
        if received is not None:
            self._early = received
        early = self._early
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: early.append(signum))

    async def serve(self, loaded: Loaded | None = None) -> int:
        """Start, run until a stop signal, stop; the exit code. Without ``loaded``, the
        config and plugins are loaded here, where a stop signal can cut the load short.
        Raises ConfigError if they are invalid. A stop that could not save the state held
        in memory (a full disk) exits EXIT_STATE, not 0: runs were lost from the history."""
        code = await self._serve(loaded)
        return EXIT_STATE if self._state_lost else code

    async def _serve(self, loaded: Loaded | None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, int(sig))
        for signum in self._early:
            self._signals.put_nowait(signum)
        self._early.clear()
        try:
            if loaded is None:
                loaded = await self._load()
                if loaded is None:
                    return EXIT_OK
            code = await start(self, loaded)
            # This frame lives as long as the daemon: it must not keep the first config, its
            # plugins and jobs alive after a reload has replaced them (self.loaded has them).
            del loaded
            if code != EXIT_OK:
                return code
            await self._main_loop()
            return await shutdown(self)
        finally:
            if self.loopwatch is not None:
                self.loopwatch.stop()
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            # Not the default actions back: a signal while the store and lock close must not
            # kill the process half-way (it is recorded and ignored; we are leaving anyway).
            self.install_early_signal_handlers()
            for timer in self._timers.values():
                timer.cancel()
            if self.control is not None:
                await self.control.close()
            if self.metrics is not None:
                await self.metrics.close()
            if self.store is not None:
                self._close_store()
            if self.lock is not None:
                self.lock.release()
            self.notifier.close()

    def _close_store(self) -> None:
        """The last commit; a full disk is waited for with what is left of the stop's time
        (at least STORE_WAIT_MIN), so a stop under systemd stays within TimeoutStopSec."""
        assert self.store is not None
        wait = STORE_WAIT_MIN
        if self.stop_by is not None:
            wait = max(self.stop_by - time.monotonic(), STORE_WAIT_MIN)
        try:
            self.store.close(wait)
        except StateNotSaved as exc:
            self._state_lost = True
            log.error(
                "state_not_saved",
                path=str(self.store.path),
                error=exc.error,
                runs_lost=exc.runs,
                ticks_lost=exc.ticks,
                other_changes_lost=exc.other,
                hint="these runs are missing from the history; a tick they ran may run again "
                "at the next start; free space under state_dir before starting again",
            )
        except Exception as exc:  # a failing disk must not keep the lock or skip exit
            self._state_lost = True
            log.error("state_close_failed", error=repr(exc))

    # -- start ------------------------------------------------------------------------------

    async def _load(self) -> Loaded | None:
        """The config and plugins, loaded in a thread while the loop listens for signals;
        None if a SIGTERM or SIGINT came first. A plugin import may take seconds or hang for
        ever: the stop must not wait for it, and the thread is left behind (the exit does not
        join it). A SIGHUP meanwhile is kept for after the start, as a reload."""
        hups = 0

        async def stop_signal() -> int:
            nonlocal hups
            while True:
                sig = await self._signals.get()
                if sig != signal.SIGHUP:
                    return sig
                hups += 1

        stop = asyncio.ensure_future(stop_signal())
        load: asyncio.Future[Loaded] | None = None
        try:
            await asyncio.sleep(0)  # one step for `stop`: a signal already queued wins now
            if not stop.done():
                config, self.start_config = self.start_config, None
                load = asyncio.ensure_future(
                    _in_thread(load_all, self.config_path, config, timeout=START_LOAD_TIMEOUT)
                )
                del config
                await asyncio.wait({stop, load}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                log.info(
                    "stopped_during_start",
                    signal=signal.Signals(stop.result()).name,
                    hint="the config and plugins were still loading",
                )
                return None
            assert load is not None
            return load.result()  # raises ConfigError, as a start on an invalid config must
        finally:
            stop.cancel()
            if load is not None:
                load.cancel()
            for _ in range(hups):
                self._signals.put_nowait(signal.SIGHUP)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def loop_name(self) -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    def _info(self) -> dict[str, Any]:
        assert self.loaded is not None and self.jobset is not None
        return {
            "pid": os.getpid(),
            "config": str(self.loaded.config.path),
            "state_dir": str(self.loaded.config.daemon.state_dir),
            "jobs": sorted(self.jobset.jobs),
        }

    def _status_line(self) -> str:
        assert self.jobset is not None
        jobs = self.jobset
        running, broken, paused = jobs.counts()
        text = f"{len(jobs.jobs)} jobs, {running} running"
        if broken:
            text += f", {broken} broken"
        if paused:
            text += f", {paused} paused"
        last = self.reloader.last if self.reloader is not None else None
        if last is not None and not last.ok:
            text += "; last reload failed"
        return text

    # -- main loop --------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if self.loopwatch is not None:
            self.loopwatch.poke()  # a reload or a stop is work: watch the loop through it
        self._signals.put_nowait(signum)

    async def _main_loop(self) -> None:
        while True:
            sig = await self._signals.get()
            if sig == signal.SIGHUP:
                self.request_reload()
            else:
                log.info("stopping", signal=signal.Signals(sig).name)
                return

    def request_reload(self) -> asyncio.Future[ReloadResult]:
        """Reload soon (SIGHUP, the control socket); the future gets the result."""
        assert self.reloader is not None
        return self.reloader.request()

    def _apply(self, new: Loaded) -> Diff:
        """Make the running daemon match a validated config (the Reloader calls this)."""
        assert self.loaded is not None and self.rt is not None and self.jobset is not None
        assert self.store is not None
        old_daemon = self.loaded.config.daemon
        new_daemon = new.config.daemon
        for key in (
            "state_dir",
            "runtime_dir",
            "thread_workers",
            "thread_workers_max",
            "process_workers",
            "control_group",
            "metrics_address",
        ):
            if getattr(old_daemon, key) != getattr(new_daemon, key):
                log.warning(
                    "restart_needed",
                    key=f"daemon.{key}",
                    hint="this setting takes effect at the next restart",
                )
        if self.loaded.config.fleet != new.config.fleet:
            # The fleet's connection, node name and lease are the running fleet ledger's.
            log.warning(
                "restart_needed", key="fleet", hint="this setting takes effect at the next restart"
            )
        if (old_daemon.log_level, old_daemon.log_format) != (
            new_daemon.log_level,
            new_daemon.log_format,
        ):
            logsetup.configure(new_daemon.log_level, new_daemon.log_format)
            self.rt.refresh_log()
        self.rt.set_host(new.host)
        # Before the tables: one no job names is closed, not "restart_needed".
        self.rt.executors.retire_unused({s.executor for s in new.specs.values() if s.executor})
        self.rt.set_executor_tables(new.config.executor_tables)
        self.rt.max_result_size = new_daemon.max_result_size
        if self.loopwatch is not None:
            self.loopwatch.threshold = new_daemon.loop_block_threshold
            self.loopwatch.is_plugin_file = _plugin_files(new)
        self.store.retention = _retention(new_daemon)
        rows = self.store.jobs()
        diff = self.jobset.apply(new.specs, rows)
        reload_fleet(self.fleet, new)
        warm_executors(self.rt, new.specs)
        # Removed jobs' counters go (status and metrics show configured jobs only, and a
        # daemon that renames jobs for months must not keep every old name); one added back
        # starts from its stored last run, as at start.
        self.rt.stats.forget(diff.removed)
        self.rt.stats.seed({name: rows[name] for name in diff.added if name in rows})
        if self.metrics is not None:
            self.metrics.sink.retain(set(self.jobset.jobs))
        self.loaded = new
        return diff

    def _reloaded(self, result: ReloadResult) -> None:
        if result.ok and self.loaded is not None:
            self.loaded.host.config_reloaded(result.added, result.changed, result.removed)
        self.notifier.ready(self._status_line())

    # -- stop -------------------------------------------------------------------------------

    async def _next_stop_signal(self) -> int:
        """The next SIGTERM/SIGINT; a SIGHUP while stopping is ignored (logged), not a force."""
        while True:
            sig = await self._signals.get()
            if sig != signal.SIGHUP:
                return sig
            log.info("reload_ignored", reason="the daemon is stopping")
