"""The daemon's lifecycle in one place: start, serve, reload, stop.

Signal handlers only record the signal; the main loop acts on it (as uvicorn and gunicorn do).
Signals that arrive while starting are queued, not lost, and acted on once started."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from taskd import log as logsetup
from taskd.config import Config, load_config
from taskd.errors import ConfigError, StateError
from taskd.plugin.manager import PluginHost
from taskd.plugin.resolve import JobSpec, resolve
from taskd.run.runtime import Runtime
from taskd.schedule.job import ScheduledJob
from taskd.state.lock import InstanceLock
from taskd.state.shared import SharedState
from taskd.state.store import StateStore
from taskd.systemd import Notifier

log = structlog.get_logger("taskd.daemon")

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_STATE = 3
CLOCK_CHECK = 10.0  # seconds between wall-clock step checks
CLOCK_STEP = 0.5  # a wall-clock jump larger than this re-times every job
RELOAD_TIMEOUT = 60.0  # seconds a reload may spend reading the config and importing plugins
FORCE_GRACE = 6.0  # after cancelling runs, how long to let them unwind (command: 5 s kill grace)


@dataclass(frozen=True, slots=True)
class Loaded:
    """A config with its plugins resolved: what a start or a reload works from."""

    config: Config
    host: PluginHost
    specs: Mapping[str, JobSpec]


def load_all(path: Path) -> Loaded:
    """Read the config, load plugins, resolve jobs. Raises ConfigError with every problem."""
    config = load_config(path)
    d = config.daemon
    host = PluginHost.load(d.plugin_dirs, entry_points=d.entry_points, disabled=d.disabled_plugins)
    specs, issues = resolve(config, host)
    for problem in host.folder_problems:
        log.warning("plugin_folder_problem", path=str(problem.path), problem=problem.message)
    if issues:
        raise ConfigError(issues)
    # The key -> line map only serves error messages, which are written by now; the daemon
    # keeps the config for its lifetime, so drop it (a few hundred bytes per job).
    return Loaded(dataclasses.replace(config, lines={}), host, specs)


class Daemon:
    def __init__(self, config_path: Path, *, notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        # Unset: a job's subprocess must not be able to speak to systemd in our name.
        self.notifier = notifier or Notifier.from_env(unset_environment=True)
        self.jobs: dict[str, ScheduledJob] = {}
        self.retiring: list[ScheduledJob] = []  # removed by a reload, finishing a run
        self.loaded: Loaded | None = None
        self.rt: Runtime | None = None
        self.store: StateStore | None = None
        self.lock: InstanceLock | None = None
        self.started_at = time.time()
        self.last_reload: dict[str, Any] = {}
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._early: list[int] = []
        self._stopping = False
        self._reload_pending = False
        self._reload_task: asyncio.Task[None] | None = None
        # The pending handle of each periodic callback (watchdog ping, clock check), replaced on
        # every run, so a daemon up for months holds two handles, not millions.
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- entry -----------------------------------------------------------------------------

    def install_early_signal_handlers(self) -> None:
        """Before the loop exists: record signals instead of dying on them."""
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self._early.append(signum))

    async def serve(self, loaded: Loaded) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signals.put_nowait, int(sig))
        for signum in self._early:
            self._signals.put_nowait(signum)
        self._early.clear()
        try:
            code = await self._start(loaded)
            if code != EXIT_OK:
                return code
            await self._main_loop()
            return await self._shutdown()
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for timer in self._timers.values():
                timer.cancel()
            if self.store is not None:
                try:
                    self.store.close()
                except Exception as exc:  # a failing disk must not keep the lock or skip exit
                    log.error("state_close_failed", error=repr(exc))
            if self.lock is not None:
                self.lock.release()
            self.notifier.close()

    # -- start ------------------------------------------------------------------------------

    async def _start(self, loaded: Loaded) -> int:
        d = loaded.config.daemon
        self.lock = InstanceLock(d.state_dir)
        try:
            self.lock.acquire()
        except StateError as exc:
            self.lock = None
            log.error("cannot_start", error=str(exc))
            return EXIT_STATE
        self.store = StateStore(d.state_dir / "state.db")
        try:
            self.store.open()
        except StateError as exc:
            self.store = None
            log.error("cannot_start", error=str(exc))
            return EXIT_STATE
        shared = SharedState(self.store.shared())
        shared.add_listener(self.store.set_shared)
        rt = Runtime(
            shared=shared,
            store=self.store,
            host=loaded.host,
            thread_workers=d.thread_workers,
            process_workers=d.process_workers,
        )
        self.rt = rt
        self.loaded = loaded
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
        for name, spec in loaded.specs.items():
            if not spec.config.enabled:
                continue
            row = rows.get(name)
            job = ScheduledJob(
                spec, rt, cursor=row.last_tick if row else None, paused=row.paused if row else False
            )
            self.jobs[name] = job
            if spec.broken:
                log.error("job_broken", job=name, error=spec.broken)
        for job in self.jobs.values():
            job.start()
        if d.metrics_address:
            log.warning(
                "metrics_not_available",
                metrics_address=d.metrics_address,
                hint="this version has no /metrics endpoint yet; the setting is ignored",
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
            jobs=len(self.jobs),
            broken=sorted(n for n, s in loaded.specs.items() if s.broken),
            loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        await loaded.host.daemon_started(self._info())
        return EXIT_OK

    def _info(self) -> dict[str, Any]:
        assert self.loaded is not None
        return {
            "pid": os.getpid(),
            "config": str(self.loaded.config.path),
            "state_dir": str(self.loaded.config.daemon.state_dir),
            "jobs": sorted(self.jobs),
        }

    def _status_line(self) -> str:
        running = sum(len(j.active) for j in self.jobs.values())
        broken = sum(1 for j in self.jobs.values() if j.spec.broken)
        text = f"{len(self.jobs)} jobs, {running} running"
        if broken:
            text += f", {broken} broken"
        if self.last_reload and not self.last_reload.get("ok"):
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
                for job in self.jobs.values():
                    job.clock_changed()
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

    def request_reload(self) -> None:
        """Reload soon. A storm of requests coalesces: one reload runs, at most one waits."""
        self._reload_pending = True
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.get_running_loop().create_task(
                self._reload_loop(), name="taskd-reload"
            )

    async def _reload_loop(self) -> None:
        while self._reload_pending and not self._stopping:
            self._reload_pending = False
            await self.reload()

    async def reload(self) -> bool:
        """Validate everything first; apply only a fully valid config. Returns success."""
        assert self.loaded is not None and self.rt is not None
        self.notifier.reloading()
        started = time.time()
        try:
            # In a thread: plugin imports and file reads must not stall the loop (and its
            # watchdog pings). Nothing live is touched until this has fully succeeded.
            new = await _in_thread(load_all, self.config_path, timeout=RELOAD_TIMEOUT)
            # A plugin broken since the start (say, a notifier missing a library) is known
            # and tolerated, as at start; one that breaks now (an edit with a typo) rejects
            # the reload, so the working version keeps running.
            before = {r.origin for r in self.loaded.host.broken}
            broken = [r for r in new.host.broken if r.origin not in before]
            if broken:
                raise _ReloadRejected(
                    "plugins failed to load: " + "; ".join(f"{r.origin}: {r.error}" for r in broken)
                )
        except TimeoutError:
            self.last_reload = {"ok": False, "at": started, "error": "timed out"}
            log.error(
                "reload_failed",
                errors=[f"loading config and plugins took longer than {RELOAD_TIMEOUT:g}s"],
                hint="a plugin's import may hang; the previous config keeps running",
            )
            self.notifier.ready(self._status_line())
            return False
        except (ConfigError, _ReloadRejected) as exc:
            self.last_reload = {"ok": False, "at": started, "error": str(exc)}
            issues = [str(i) for i in exc.issues] if isinstance(exc, ConfigError) else [str(exc)]
            log.error(
                "reload_failed",
                errors=issues,
                hint="the previous config keeps running; fix the file and reload again",
            )
            self.notifier.ready(self._status_line())
            return False
        except Exception as exc:
            self.last_reload = {"ok": False, "at": started, "error": repr(exc)}
            log.exception(
                "reload_failed", error=repr(exc), hint="the previous config keeps running"
            )
            self.notifier.ready(self._status_line())
            return False
        try:
            added, changed, removed = self._apply(new)
        except Exception as exc:  # a bug while applying must not end reloads for good
            self.last_reload = {"ok": False, "at": started, "error": repr(exc)}
            log.exception("reload_apply_failed", error=repr(exc))
            self.notifier.ready(self._status_line())
            return False
        self.last_reload = {
            "ok": True,
            "at": started,
            "added": added,
            "changed": changed,
            "removed": removed,
        }
        log.info(
            "reloaded",
            added=added,
            changed=changed,
            removed=removed,
            took=round(time.time() - started, 3),
        )
        new.host.config_reloaded(added, changed, removed)
        self.notifier.ready(self._status_line())
        return True

    def _apply(self, new: Loaded) -> tuple[list[str], list[str], list[str]]:
        assert self.loaded is not None and self.rt is not None
        old_daemon = self.loaded.config.daemon
        new_daemon = new.config.daemon
        for key in ("state_dir", "runtime_dir", "thread_workers", "process_workers"):
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
        wanted = {n: s for n, s in new.specs.items() if s.config.enabled}
        added: list[str] = []
        changed: list[str] = []
        removed: list[str] = []
        for name in list(self.jobs):
            if name not in wanted:
                gone = self.jobs.pop(name)
                gone.remove()
                if gone.active:
                    self.retiring.append(gone)
                removed.append(name)
        assert self.store is not None
        paused = self.store.paused_jobs()
        for name, spec in wanted.items():
            job = self.jobs.get(name)
            back = next((j for j in self.retiring if j.name == name and j.active), None)
            if job is None and back is not None:
                self.retiring.remove(back)
                back.revive(spec)
                self.jobs[name] = back
                added.append(name)
            elif job is None:
                job = ScheduledJob(spec, self.rt, cursor=None, paused=name in paused)
                self.jobs[name] = job
                job.start()
                added.append(name)
            elif not job.spec.same_as(spec):
                job.update(spec)
                changed.append(name)
        self.retiring = [j for j in self.retiring if j.active]
        self.loaded = Loaded(new.config, new.host, new.specs)
        return added, changed, removed

    # -- stop -------------------------------------------------------------------------------

    async def _next_stop_signal(self) -> int:
        """The next SIGTERM/SIGINT; a SIGHUP while stopping is ignored (logged), not a force."""
        while True:
            sig = await self._signals.get()
            if sig != signal.SIGHUP:
                return sig
            log.info("reload_ignored", reason="the daemon is stopping")

    async def _shutdown(self) -> int:
        assert self.loaded is not None and self.rt is not None
        self._stopping = True
        self.rt.stopping = True  # a run that fails now is not retried: there is no later
        d = self.loaded.config.daemon
        self.notifier.stopping("stopping: draining runs")
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_task.cancel()
        everyone = [*self.jobs.values(), *self.retiring]
        for job in everyone:
            job.stop()  # first: no new run may start while the stopping hooks run
        for job in everyone:
            # A run waiting to retry has nothing to finish: stop it now, not at the deadline.
            for task, info in list(job.active.values()):
                if info.in_backoff:
                    info.cancel_reason = "daemon stopping"
                    task.cancel()
        # The stopping hooks run alongside the drain, not before it: their time must not come
        # out of the drain's (systemd's TimeoutStopSec covers both).
        stopping_hooks = asyncio.ensure_future(self.loaded.host.daemon_stopping(self._info()))
        runs = [task for job in everyone for task, _ in job.active.values()]
        forced = False
        if runs:
            log.info("draining", runs=len(runs), timeout=d.shutdown_timeout)
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
            for job in everyone:
                job.cancel_runs("daemon stopping")
            await self.rt.close(kill=True)
            await asyncio.wait(left, timeout=remaining())
        else:
            await self.rt.close(kill=False, timeout=remaining())
        tasks = [j.task for j in everyone if j.task is not None and not j.task.done()]
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


class _ReloadRejected(Exception):
    pass


T = TypeVar("T")


async def _in_thread(func: Callable[..., T], /, *args: Any, timeout: float) -> T:
    """Run ``func`` in a daemon thread of its own and await it for at most ``timeout``.

    Not asyncio.to_thread: a call that never returns (a plugin import that hangs) would sit
    in the default executor, which asyncio waits for, without limit, when the loop closes."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = func(*args)
        except BaseException as exc:  # delivered to the awaiting task, not lost in the thread
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name="taskd-load", daemon=True).start()
    return await asyncio.wait_for(fut, timeout)
