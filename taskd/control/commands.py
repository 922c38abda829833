"""What the daemon answers on its control socket: one method per command.

The server (taskd.control.server) owns the socket, peer checks and limits; this module only
turns a checked request into an answer, from the daemon's job table and reloader. Replies are
JSON-able dicts; a refusal raises ControlError with a message that says what to do."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from taskd._version import __version__
from taskd.config.checks import suggest
from taskd.control.protocol import PROTOCOL_VERSION, ControlError, ErrorCode
from taskd.run.events import SkipReason
from taskd.schedule.jobset import SKIP_TEXT, JobSet, NoSuchJob
from taskd.schedule.manual import ManualRun

if TYPE_CHECKING:
    from taskd.daemon import Daemon
    from taskd.run.runner import RunInfo

MAX_REPLY_RESULT = 1 << 20  # characters of a run's result in a trigger --wait reply


class Commands:
    """The command table. ``handle`` is the server's handler."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        method = getattr(self, f"cmd_{cmd}", None) if cmd.isidentifier() else None
        if method is None:
            known = sorted(n[4:] for n in dir(self) if n.startswith("cmd_"))
            hint = suggest(cmd, known)
            raise ControlError(
                ErrorCode.UNKNOWN_COMMAND,
                f"unknown command {cmd!r}"
                + (f"; {hint}" if hint else f"; known: {', '.join(known)}"),
            )
        return await method(args)

    # -- helpers -------------------------------------------------------------------------------

    @property
    def jobs(self) -> JobSet:
        jobs = self.daemon.jobset
        if jobs is None:  # the socket opens before the jobs are scheduled
            raise ControlError(ErrorCode.BUSY, "taskd is still starting; try again in a moment")
        return jobs

    def _not_stopping(self) -> None:
        """Refuse what would start or change something once the stop has begun (the socket
        stays open through the drain for status and for `trigger --wait` replies)."""
        if self.daemon.stopping:
            raise ControlError(
                ErrorCode.STOPPING, "taskd is stopping: it starts and changes nothing now"
            )

    def _job_name(self, args: dict[str, Any]) -> str:
        name = args.get("job")
        if not isinstance(name, str) or not name:
            raise ControlError(ErrorCode.BAD_REQUEST, "args.job: a job name (string) is required")
        return name

    def _no_such_job(self, name: str) -> ControlError:
        loaded = self.daemon.loaded
        config = loaded.config if loaded is not None else None
        if config is not None and name in config.jobs and not config.jobs[name].enabled:
            return ControlError(
                ErrorCode.NOT_FOUND,
                f"job {name!r} is disabled in {config.path} (enabled = false); "
                "enable it and reload",
            )
        hint = suggest(name, self.jobs.jobs)
        where = f" in {config.path}" if config is not None else ""
        return ControlError(
            ErrorCode.NOT_FOUND,
            f"no job {name!r}{where}" + (f"; {hint}" if hint else ""),
        )

    # -- read commands -------------------------------------------------------------------------

    async def cmd_ping(self, args: dict[str, Any]) -> Any:
        return {"pid": os.getpid(), "version": __version__, "protocol": PROTOCOL_VERSION}

    async def cmd_status(self, args: dict[str, Any]) -> Any:
        d = self.daemon
        jobs = self.jobs
        rt = d.rt
        now = time.time()
        last = d.reloader.last if d.reloader is not None else None
        config = d.loaded.config if d.loaded is not None else None
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "python": sys.version.split()[0],
                "loop": d.loop_name,
                "started": d.started_at,
                "uptime": round(now - d.started_at, 3),
                "config": str(d.config_path),
                "state_dir": str(config.daemon.state_dir) if config else None,
                "socket": str(d.control.path) if d.control is not None else None,
                "stopping": d.stopping,
                "jobs": len(jobs.jobs),
                "running": jobs.running(),
                "paused": len(jobs.paused()),
                "broken": len(jobs.broken()),
                "retiring": len(jobs.retiring),
                "stuck_threads": rt.threads.stuck_count if rt is not None else 0,
                # The blocking pool: its size, cap, threads, and why it is exhausted (if so).
                "threads": rt.threads.status().as_dict() if rt is not None else None,
                # Why the process pool is degraded (workers crash-looping), None when fine.
                "pool_degraded": rt.pool_degraded if rt is not None else None,
                # Executors started besides the built-in pools (a dask cluster's figures).
                "executors": {
                    name: dict(figures)
                    for name, figures in (rt.executors.gauges() if rt is not None else {}).items()
                    if name not in ("thread", "process")
                },
                "state_write_failing": bool(d.store is not None and d.store.failing),
                "last_reload": last.as_dict() if last is not None else None,
            },
            # Fleet jobs: this node, the database (up/down/reconnecting/refused), how far
            # this host's clock is off the database's, claims lost; None without one.
            "fleet": d.fleet.status() if d.fleet is not None else None,
            "jobs": jobs.status(now),
        }

    async def cmd_jobs(self, args: dict[str, Any]) -> Any:
        rows = self.jobs.status()
        name = args.get("job")
        if name is not None:
            rows = [r for r in rows if r["name"] == name]
            if not rows:
                raise self._no_such_job(str(name))
        return {"jobs": rows, "now": time.time()}

    # -- actions -------------------------------------------------------------------------------

    async def cmd_trigger(self, args: dict[str, Any]) -> Any:
        name = self._job_name(args)
        wait = args.get("wait", False)
        if not isinstance(wait, bool):
            raise ControlError(ErrorCode.BAD_REQUEST, "args.wait: true or false")
        jobs = self.jobs
        self._not_stopping()
        manual = ManualRun()
        try:
            reason = jobs.trigger(name, manual)
        except NoSuchJob:
            raise self._no_such_job(name) from None
        if reason is not None:
            raise _refused(name, reason)
        if manual.queued and not wait:
            return {"job": name, "state": "queued"}
        # Shielded: a client that goes away cancels this handler, never the run's futures.
        started = await asyncio.shield(manual.started)
        if isinstance(started, SkipReason):
            raise _refused(name, started)
        if not wait:
            return {"job": name, "state": "started", "run_id": started.run_id}
        ended = await asyncio.shield(manual.ended)
        if isinstance(ended, SkipReason):
            raise _refused(name, ended)
        return _run_reply(ended)

    async def cmd_pause(self, args: dict[str, Any]) -> Any:
        name = self._job_name(args)
        await self._fleet_paused(name, True)
        return self._set_paused(name, True)

    async def cmd_resume(self, args: dict[str, Any]) -> Any:
        name = self._job_name(args)
        await self._fleet_paused(name, False)
        return self._set_paused(name, False)

    async def _fleet_paused(self, name: str, paused: bool) -> None:
        """A fleet job is paused or resumed fleet-wide first, on record in the fleet's
        database before the command answers; if that cannot be done, nothing is changed."""
        self._not_stopping()
        job = self.jobs.jobs.get(name)
        publish = getattr(job.ledger, "publish_paused", None) if job is not None else None
        if publish is None:
            return  # a host job (or no such job: _set_paused says so)
        try:
            await publish(name, paused)
        except Exception as exc:
            what = "pause" if paused else "resume"
            raise ControlError(
                ErrorCode.REFUSED,
                f"{exc}: the {what} of fleet job {name!r} was not made (on any host); "
                f"try again when the fleet database answers",
            ) from None

    def _set_paused(self, name: str, paused: bool) -> Any:
        self._not_stopping()
        try:
            changed = self.jobs.set_paused(name, paused)
        except NoSuchJob:
            raise self._no_such_job(name) from None
        return {"job": name, "paused": paused, "changed": changed}

    async def cmd_reload(self, args: dict[str, Any]) -> Any:
        self._not_stopping()
        if self.daemon.reloader is None:
            raise ControlError(ErrorCode.BUSY, "taskd is still starting; try again in a moment")
        result = await self.daemon.request_reload()
        return result.as_dict()


def _refused(name: str, reason: SkipReason) -> ControlError:
    why = SKIP_TEXT.get(reason, str(reason))
    return ControlError(ErrorCode.REFUSED, f"job {name!r} was not run: {why}")


def _run_reply(info: RunInfo) -> dict[str, Any]:
    result: Any = info.result
    try:
        text = json.dumps(result, allow_nan=False)  # the reply is strict JSON
    except (TypeError, ValueError):
        result = text = repr(result)
    if len(text) > MAX_REPLY_RESULT:
        result = text[:MAX_REPLY_RESULT] + "...(truncated)"
    return {
        "job": info.job,
        "run_id": info.run_id,
        "cause": str(info.cause),
        "outcome": str(info.outcome),
        "attempts": info.attempt,
        "started": info.started,
        "duration": round(info.ended - info.started, 6) if info.ended else None,
        "error": info.error,
        "result": result,
    }
