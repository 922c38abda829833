"""The daemon's lifecycle in one place: start, serve, reload, stop.

Signal handlers only record the signal; the main loop acts on it (as uvicorn and gunicorn do).
Signals that arrive while starting are queued, not lost, and acted on once started."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from taskd import log as logsetup
from taskd.errors import StateError
from taskd.observe.loopwatch import LoopWatch
from taskd.reload import Loaded, Reloader, ReloadResult, _in_thread, load_all
from taskd.run.runtime import Runtime
from taskd.schedule.jobset import Diff, JobSet
from taskd.state.dbfile import describe
from taskd.state.lock import InstanceLock
from taskd.state.retention import Retention
from taskd.state.shared import SharedState
from taskd.state.store import StateStore
from taskd.systemd import Notifier

if TYPE_CHECKING:
    from taskd.config.model import Config, DaemonConfig
    from taskd.control.server import ControlServer
    from taskd.observe.http import MetricsServer

log = structlog.get_logger("taskd.daemon")

EXIT_OK = 0
EXIT_STATE = 3
CLOCK_CHECK = 10.0  # seconds between wall-clock step checks
CLOCK_STEP = 0.5  # a wall-clock jump larger than this re-times every job
FORCE_GRACE = 6.0  # after cancelling runs, how long to let them unwind (command: 5 s kill grace)
# _in_thread wants a bound, a start has none of its own: a stop signal ends a slow load now,
# and under systemd TimeoutStartSec bounds it. A day is none, in effect.
START_LOAD_TIMEOUT = 86400.0


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
        Raises ConfigError if they are invalid."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signals.put_nowait, int(sig))
        for signum in self._early:
            self._signals.put_nowait(signum)
        self._early.clear()
        try:
            if loaded is None:
                loaded = await self._load()
                if loaded is None:
                    return EXIT_OK
            code = await self._start(loaded)
            # This frame lives as long as the daemon: it must not keep the first config, its
            # plugins and jobs alive after a reload has replaced them (self.loaded has them).
            del loaded
            if code != EXIT_OK:
                return code
            await self._main_loop()
            return await self._shutdown()
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
                try:
                    self.store.close()
                except Exception as exc:  # a failing disk must not keep the lock or skip exit
                    log.error("state_close_failed", error=repr(exc))
            if self.lock is not None:
                self.lock.release()
            self.notifier.close()

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

    async def _start(self, loaded: Loaded) -> int:
        d = loaded.config.daemon
        self.lock = InstanceLock(d.state_dir)
        try:
            self.lock.acquire()
        except OSError as exc:  # StateError, or a full or failing disk writing the pid
            self.lock.release()
            self.lock = None
            error = str(exc) if isinstance(exc, StateError) else describe(exc, where=d.state_dir)
            log.error(
                "cannot_start", error=error, state_dir=str(d.state_dir), **_trust_hint(loaded)
            )
            return EXIT_STATE
        # The resolved state_dir the lock checked (taskd.state.files.prepare_dir): its every
        # folder is trusted, so what it names cannot be changed by another user meanwhile.
        self.store = StateStore(self.lock.path.parent / "state.db", _retention(d))
        try:
            self.store.open()
        except StateError as exc:
            self.store = None
            log.error("cannot_start", error=str(exc))
            return EXIT_STATE
        # The control socket comes after the lock (a live socket of this state_dir's daemon
        # can then not be ours to replace) and before READY=1 (a unit ordered after taskd may
        # use it at once).
        from taskd.control.commands import Commands
        from taskd.control.server import ControlServer

        control = ControlServer(
            d.runtime_dir / "control.sock", Commands(self).handle, group=d.control_group
        )
        try:
            await control.start()
        except (StateError, OSError) as exc:
            log.error("cannot_start", error=str(exc))
            return EXIT_STATE
        self.control = control
        shared = SharedState(self.store.shared())
        shared.add_listener(self.store.set_shared)
        rt = Runtime(
            shared=shared,
            store=self.store,
            host=loaded.host,
            thread_workers=d.thread_workers,
            process_workers=d.process_workers,
            max_result_size=d.max_result_size,
            thread_workers_max=d.thread_workers_max,
        )
        self.rt = rt
        self.loaded = loaded
        if d.metrics_address:
            # Imported only when asked for: aiohttp and prometheus_client cost start-up time
            # and memory that a daemon without metrics should not pay. Before the pool warms,
            # so a bind failure leaves no forked workers behind.
            from taskd.observe.http import MetricsServer

            metrics = MetricsServer(d.metrics_address, self)
            try:
                await metrics.start()
            except StateError as exc:
                log.error("cannot_start", error=str(exc))
                return EXIT_STATE
            self.metrics = metrics
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
        rows = self.store.jobs()
        rt.stats.seed(rows)
        self.jobset = JobSet(rt)
        self.jobset.apply(loaded.specs, rows)
        # Right after the jobs start (no await between): a startup run that blocks the loop
        # is already watched.
        self.loopwatch = _loop_watch(d.loop_block_threshold, self.jobset)
        self.loopwatch.is_plugin_file = _plugin_files(loaded)
        self.reloader = Reloader(
            self.config_path,
            loaded,
            self._apply,
            before=self.notifier.reloading,
            after=self._reloaded,
        )
        self._start_timers()
        # Everything made so far (config, plugins, one task per job) lives as long as the
        # daemon: move it out of the cyclic collector's way, so a full collection during a
        # burst of runs does not walk 10,000 jobs' worth of objects.
        gc.collect()
        gc.freeze()
        self.notifier.ready(self._status_line())
        log.info(
            "started",
            pid=os.getpid(),
            config=str(loaded.config.path),
            jobs=len(self.jobset.jobs),
            broken=self.jobset.broken(),
            loop=self.loop_name,
            control=str(control.path),
        )
        await loaded.host.daemon_started(self._info())
        return EXIT_OK

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
        text = f"{len(jobs.jobs)} jobs, {jobs.running()} running"
        broken = len(jobs.broken())
        if broken:
            text += f", {broken} broken"
        paused = len(jobs.paused())
        if paused:
            text += f", {paused} paused"
        last = self.reloader.last if self.reloader is not None else None
        if last is not None and not last.ok:
            text += "; last reload failed"
        return text

    def _start_timers(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.notifier.watchdog_interval
        if interval:
            # Pinged from a loop callback: if the loop is blocked, the pings stop and systemd
            # restarts us, which is the point.
            def ping() -> None:
                self.notifier.ping()
                self._timers["watchdog"] = loop.call_later(interval, ping)

            ping()
        offset = time.time() - loop.time()
        last_status = ""

        def clock_check() -> None:
            nonlocal offset, last_status
            now_offset = time.time() - loop.time()
            if abs(now_offset - offset) > CLOCK_STEP:
                log.warning("clock_stepped", by=round(now_offset - offset, 3))
                if self.jobset is not None:
                    self.jobset.clock_changed()
            offset = now_offset
            status = self._status_line()
            if status != last_status:
                self.notifier.status(status)
                last_status = status
            self._timers["clock"] = loop.call_later(CLOCK_CHECK, clock_check)

        self._timers["clock"] = loop.call_later(CLOCK_CHECK, clock_check)

    # -- main loop --------------------------------------------------------------------------

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
        if (old_daemon.log_level, old_daemon.log_format) != (
            new_daemon.log_level,
            new_daemon.log_format,
        ):
            logsetup.configure(new_daemon.log_level, new_daemon.log_format)
            self.rt.refresh_log()
        self.rt.set_host(new.host)
        self.rt.max_result_size = new_daemon.max_result_size
        if self.loopwatch is not None:
            self.loopwatch.threshold = new_daemon.loop_block_threshold
            self.loopwatch.is_plugin_file = _plugin_files(new)
        self.store.retention = _retention(new_daemon)
        rows = self.store.jobs()
        diff = self.jobset.apply(new.specs, rows)
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

    async def _shutdown(self) -> int:
        assert self.loaded is not None and self.rt is not None and self.jobset is not None
        self._stopping = True
        self.rt.stopping = True  # a run that fails now is not retried: there is no later
        d = self.loaded.config.daemon
        self.notifier.stopping("stopping: draining runs")
        # The control socket stays open through the drain: status shows what is draining and
        # a `trigger --wait` learns its run's outcome; every command that would start or
        # change something is refused from now on (see control/commands.py). It closes in
        # serve()'s finally, before the store.
        if self.reloader is not None:
            self.reloader.close()
        jobs = self.jobset
        runs = jobs.stop()
        # The stopping hooks run alongside the drain, not before it: their time must not come
        # out of the drain's (systemd's TimeoutStopSec covers both).
        stopping_hooks = asyncio.ensure_future(self.loaded.host.daemon_stopping(self._info()))
        forced = False
        if runs:
            log.info(
                "draining",
                runs=len(runs),
                jobs=sorted({j.name for j in jobs.everyone() if j.active}),
                timeout=d.shutdown_timeout,
            )
            drained = asyncio.ensure_future(asyncio.wait(runs, timeout=d.shutdown_timeout))
            second = asyncio.ensure_future(self._next_stop_signal())
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
            await self.rt.close(kill=True)
            await asyncio.wait(left, timeout=remaining())
        else:
            await self.rt.close(kill=False, timeout=remaining())
        tasks = jobs.tasks()
        for task in tasks:
            if task not in left:  # an inline run's task was cancelled above already
                task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=remaining())
        await asyncio.wait([stopping_hooks], timeout=remaining() or 0.001)
        await self.rt.settle()  # the last runs' log lines and history rows, before the store closes
        await self.loaded.host.drain_hooks()
        stuck = self.rt.threads.stuck_count
        log.info(
            "stopped",
            forced=forced,
            stuck_threads=stuck,
            uptime=round(time.time() - self.started_at, 3),
        )
        return EXIT_OK


def _loop_watch(threshold: float, jobset: JobSet) -> LoopWatch:
    """Measure the loop's lag and name whatever blocks it (taskd.observe.loopwatch)."""

    def run_ids(job: str) -> list[str]:
        scheduled = jobset.jobs.get(job)
        return list(scheduled.active) if scheduled is not None else []

    watch = LoopWatch(threshold, run_ids)
    watch.start(asyncio.get_running_loop())
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
