"""The commands that need no running daemon: run (the daemon itself), check, plugins, next, exec."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from taskd.cli import fmt
from taskd.cli.common import (
    EX_CONFIG,
    EXIT_FAIL,
    EXIT_OK,
    config_path,
    emit,
    no_such_job,
    path_exists,
    plural,
    print_config_error,
    print_trust_report,
    trust_report,
)
from taskd.config import load_config
from taskd.config.load import ConfigRead
from taskd.errors import ConfigError

if TYPE_CHECKING:
    from taskd.config.model import Config
    from taskd.daemon import Daemon

# -- run ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    path = config_path(args)
    # The config parses in a process of its own (taskd.config.source): started first (by
    # taskd.cli.main, before this module's imports), it runs on another core while the
    # daemon's modules are imported here.
    reading = ConfigRead(path, getattr(args, "parse", None))
    from taskd import log as logsetup
    from taskd.cli import EARLY_SIGNALS
    from taskd.daemon import Daemon

    # The modules live as long as the daemon: out of the cyclic collector's way now, so that
    # the one collection of the start (taskd.daemon.start) walks only what the start builds
    # (about half the objects, and half its time).
    gc.freeze()
    daemon = Daemon(path)
    # taskd.cli.main has been recording signals since before its imports; the daemon takes
    # over that list, and acts on what it holds once its loop listens.
    daemon.install_early_signal_handlers(EARLY_SIGNALS)
    try:
        config = reading.load()
    except ConfigError as exc:
        logsetup.configure()
        others, hints = trust_report(exc, path)
        print_config_error(exc)
        print_trust_report(others, hints)
        return EX_CONFIG
    logsetup.configure(config.daemon.log_level, config.daemon.log_format)
    # The daemon starts from this very config rather than reading the file again, and this
    # frame (alive as long as the daemon) must not keep it: with its key -> line map it is
    # about 1.7 KB per job that the daemon's own copy no longer holds.
    daemon.start_config = config
    del config
    try:
        # Loads the plugins in a thread, so that a SIGTERM during a slow import ends the
        # start at once (exit 0, nothing started) instead of after the import.
        code = _run_daemon(daemon)
    except ConfigError as exc:
        print_config_error(exc)
        code = EX_CONFIG
    # Everything is saved and released by now. Leave without closing the loop (asyncio would
    # wait, unbounded, for its default executor and for tasks that ignore cancellation) and
    # without the interpreter's exit, which joins every thread: one stuck in a job (a
    # blocking run past its timeout, a to_thread call whose run was cancelled, a plugin
    # import that hangs) would otherwise hold the process until SIGKILL.
    _run_exit_finalizers()
    logsetup.flush_std_streams()  # a closed or full stdout must not stop the exit
    os._exit(code)


def _run_exit_finalizers() -> None:
    """What a normal exit would clean up, minus joining threads and child processes:
    multiprocessing's finalizers remove its temporary directory (the forkserver's socket),
    which would otherwise be left in /tmp by every daemon run."""
    try:
        import multiprocessing
        import shutil

        # Only the temp directory: other finalizers (a plugin's Queue or Pool) may join
        # threads or processes, the very waits os._exit is there to skip.
        tempdir = multiprocessing.current_process()._config.get("tempdir")  # type: ignore[attr-defined]
        if tempdir:
            shutil.rmtree(tempdir, ignore_errors=True)
    except Exception:  # best effort: the exit must happen regardless
        pass


def _run_daemon(daemon: Daemon) -> int:
    """The daemon's serve() on a new loop, to its end: a SystemExit or KeyboardInterrupt from
    any other task (one a plugin started) is that plugin's failure, logged, and the daemon
    goes on (taskd.loop.run_main)."""
    from taskd.loop import Stray, new_loop, run_main

    def plugin_task_raised(stray: Stray) -> None:
        import structlog

        host = daemon.loaded.host if daemon.loaded is not None else None
        structlog.get_logger("taskd.plugins").error(
            "plugin_task_raised",
            plugin=host.plugin_of(stray.files) if host is not None else None,
            task=stray.task,
            coro=stray.coro,
            error=f"{type(stray.exc).__name__}: {stray.exc}",
            exc_info=stray.exc,
        )

    return run_main(new_loop(), daemon.serve(), plugin_task_raised)


# -- check -------------------------------------------------------------------------------------


def _fleet_summary(config: Config) -> dict[str, Any]:
    """What `taskd check` says about [fleet]: the database without its user's password (there
    is none in the DSN: the config refuses it), this host's node name, the fleet jobs."""
    from urllib.parse import urlsplit

    fleet = config.fleet
    assert fleet is not None
    parts = urlsplit(fleet.dsn)
    return {
        "node": fleet.node,
        "database": f"{parts.scheme}://{parts.netloc}{parts.path}",
        "jobs": sum(1 for j in config.jobs.values() if j.scope == "fleet"),
        "lease": fleet.lease,
        "sweep": fleet.sweep,
    }


def cmd_check(args: argparse.Namespace) -> int:
    from taskd import log as logsetup
    from taskd.plugin.manager import PluginHost
    from taskd.plugin.resolve import resolve

    logsetup.configure("critical", "console", sys.stderr)  # the report below says it all
    path = config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        others, hints = trust_report(exc, path)
        if args.json:
            emit({"ok": False, "errors": [str(i) for i in exc.issues] + others, "hints": hints})
        else:
            print_config_error(exc)
            print_trust_report(others, hints)
        return EXIT_FAIL
    d = config.daemon
    host = PluginHost.load(d.plugin_dirs, entry_points=d.entry_points, disabled=d.disabled_plugins)
    specs, issues = resolve(config, host)
    errors = [str(i) for i in issues]
    for record in host.broken:
        errors.append(f"{record.origin}: plugin {record.name!r} is broken: {record.error}")
    for problem in host.folder_problems:
        errors.append(f"{problem.path}: {problem.message}")
    from taskd.state.files import audit
    from taskd.trust_report import combined_hints, survey

    errors.extend(audit(d.state_dir))  # what `taskd run` would refuse to start on
    # The same problems, each once with its fix apart, for one command that fixes many.
    hints = combined_hints(survey(config.path, d)) if errors else []
    for spec in specs.values():
        if spec.broken:
            line = config.line_of(f"jobs.{spec.name}.type")
            where = f"{config.path}:{line}" if line else str(config.path)
            errors.append(f"{where}: jobs.{spec.name}: job is broken: {spec.broken}")
    kinds: dict[str, int] = {}
    for spec in specs.values():
        if spec.jobtype is not None:
            kinds[spec.jobtype.kind] = kinds.get(spec.jobtype.kind, 0) + 1
    if args.json:
        emit(
            {
                "ok": not errors,
                "errors": errors,
                "jobs": len(config.jobs),
                "kinds": kinds,
                "plugins": len(host.records),
                **({"hints": hints} if errors else {}),  # commands that fix several at once
                **({"fleet": _fleet_summary(config)} if config.fleet is not None else {}),
            }
        )
        return EXIT_FAIL if errors else EXIT_OK
    if errors:
        print(
            f"taskd: {path}: {len(errors)} error{'s' if len(errors) != 1 else ''}:", file=sys.stderr
        )
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        for hint in hints:
            print(f"taskd: hint: {hint}", file=sys.stderr)
        return EXIT_FAIL
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    disabled = sum(1 for j in config.jobs.values() if not j.enabled)
    print(
        f"taskd: {path}: OK: {len(config.jobs)} jobs ({by_kind}"
        + (f"; {disabled} disabled" if disabled else "")
        + f"), {plural(len(host.records), 'plugin')}, {plural(len(host.job_types), 'job type')}"
    )
    if config.fleet is not None:
        fleet = _fleet_summary(config)
        print(
            f"taskd: fleet: node {fleet['node']!r}, {plural(fleet['jobs'], 'fleet job')}, "
            f"database {fleet['database']} (not contacted by check)"
        )
    now = time.time()
    for job in config.jobs.values():
        if job.schedule == "at" and job.at is not None and job.at <= now and job.enabled:
            # Valid, but almost certainly not what was meant: say so, without failing.
            when = datetime.fromtimestamp(job.at, ZoneInfo(job.timezone)).isoformat()
            print(
                f"  warning: jobs.{job.name}.at = {when} is in the past; a job seen for the first time then never runs"
            )
    return EXIT_OK


# -- plugins -----------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    from taskd import log as logsetup
    from taskd.plugin.manager import PluginHost
    from taskd.plugin.options import describe_options

    logsetup.configure("critical", "console", sys.stderr)
    path = config_path(args)
    dirs: tuple[Path, ...] = ()
    entry_points = True
    disabled: tuple[str, ...] = ()
    try:
        config = load_config(path)
        dirs, entry_points, disabled = (
            config.daemon.plugin_dirs,
            config.daemon.entry_points,
            config.daemon.disabled_plugins,
        )
    except ConfigError as exc:
        if args.config or os.environ.get("TASKD_CONFIG") or path_exists(path):
            print_config_error(exc)
            return EXIT_FAIL
    dirs = dirs + tuple(Path(p).absolute() for p in args.plugin_dir)
    host = PluginHost.load(dirs, entry_points=entry_points, disabled=disabled)
    rows: list[dict[str, Any]] = []
    for r in host.records:
        types: list[dict[str, Any]] = []
        for name in r.job_types:
            jt = host.job_types[name]
            types.append(
                {
                    "name": name,
                    "kind": jt.kind,
                    "description": jt.description,
                    "options": describe_options(jt),
                }
            )
        rows.append(
            {
                "name": r.name,
                "source": r.source,
                "origin": r.origin,
                "broken": r.error,
                "job_types": types,
                "traceback": r.traceback,
            }
        )
    if args.json:
        emit(
            {
                "plugins": rows,
                "conflicts": host.conflicts,
                "folder_problems": [
                    {"path": str(p.path), "problem": p.message} for p in host.folder_problems
                ],
            }
        )
        return EXIT_OK if not host.broken else EXIT_FAIL
    if not rows:
        print("no plugins found" + (f" (plugin_dirs: {', '.join(map(str, dirs))})" if dirs else ""))
    # What plugins say of themselves (names, descriptions, errors) is shown, never obeyed:
    # see fmt.safe.
    safe = fmt.safe
    for row in rows:
        status = "BROKEN" if row["broken"] else "ok"
        print(safe(f"{row['name']}  [{row['source']}, {status}]  {row['origin']}"))
        if row["broken"]:
            print(f"    error: {safe(str(row['broken']))}")
            if args.verbose and row["traceback"]:
                print("    " + fmt.safe_lines(row["traceback"].rstrip()).replace("\n", "\n    "))
        for t in row["job_types"]:
            print(
                safe(
                    f"    {t['name']} ({t['kind']})"
                    f"{': ' + t['description'] if t['description'] else ''}"
                )
            )
            if args.verbose:
                for o in t["options"]:
                    req = "required" if o["required"] else f"default {o['default']}"
                    print(safe(f"        {o['name']}: {o['type'] or 'any'} ({req})"))
    for why in host.conflicts.values():
        print(f"conflict: {safe(str(why))}")
    for p in host.folder_problems:
        print(safe(f"warning: {p.path}: {p.message}"))
    return EXIT_OK if not host.broken else EXIT_FAIL


# -- next --------------------------------------------------------------------------------------


def cmd_next(args: argparse.Namespace) -> int:
    from taskd.jobspec import make_trigger
    from taskd.schedule.triggers import upcoming

    try:
        config = load_config(config_path(args))
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_FAIL
    job = config.jobs.get(args.job)
    if job is None:
        return no_such_job(args.job, config.jobs, config.path)
    trigger = make_trigger(job)
    if trigger is None:
        times: list[float] = []
    else:
        times = upcoming(trigger, time.time(), args.n)
    zone = ZoneInfo(job.timezone)
    if args.json:
        emit(
            {
                "job": job.name,
                "schedule": job.schedule_text(),
                "enabled": job.enabled,
                "next": [datetime.fromtimestamp(t, UTC).isoformat() for t in times],
            }
        )
        return EXIT_OK
    print(fmt.safe(f"{job.name}: {job.schedule_text()}") + ("" if job.enabled else " (disabled)"))
    if trigger is None:
        print("  runs once each time the daemon starts")
    elif not times:
        print("  no upcoming runs")
    for t in times:
        local = datetime.fromtimestamp(t, zone)
        utc = datetime.fromtimestamp(t, UTC)
        print(f"  {local.isoformat(sep=' ')}  ({utc.strftime('%Y-%m-%d %H:%M:%S')} UTC)")
    if job.jitter:
        print(f"  plus up to {job.jitter:g}s of random jitter each")
    return EXIT_OK
