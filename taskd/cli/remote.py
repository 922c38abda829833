"""The commands that talk to a running daemon over its control socket: status, jobs, trigger,
pause, resume, reload. Each sends one request and prints the reply; with --json the reply's
data as it came."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from taskd.cli import fmt
from taskd.cli.common import (
    EXIT_FAIL,
    EXIT_NO_DAEMON,
    EXIT_OK,
    daemon_dirs,
    emit,
    plural,
    print_error_lines,
)
from taskd.control.client import NoDaemon, request
from taskd.control.protocol import SOCKET_NAME, ControlError

RESULT_WIDTH = 60  # characters of a result or error in a table cell


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, else $TASKD_SOCKET, else runtime_dir/control.sock of the config (read
    leniently: a config with a typo still names its runtime_dir)."""
    explicit = getattr(args, "socket", None) or os.environ.get("TASKD_SOCKET")
    if explicit:
        return Path(explicit)
    _, runtime_dir = daemon_dirs(args)
    return runtime_dir / SOCKET_NAME


def _call(
    args: argparse.Namespace,
    cmd: str,
    payload: dict[str, Any] | None = None,
    *,
    timeout: float | None = 30.0,
) -> tuple[int, Any]:
    """(exit code, data): the data on success; an error is printed and gives its exit code."""
    try:
        return EXIT_OK, request(socket_path(args), cmd, payload, timeout=timeout)
    except NoDaemon as exc:
        if getattr(args, "json", False):
            emit({"ok": False, "error": {"code": "no_daemon", "message": str(exc)}})
        print(f"taskd: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON, None
    except ControlError as exc:
        if getattr(args, "json", False):
            emit({"ok": False, "error": {"code": str(exc.code), "message": exc.message}})
        else:
            print(f"taskd: {exc.message}", file=sys.stderr)
        return EXIT_FAIL, None


# -- status and jobs -----------------------------------------------------------------------------


def _state(row: dict[str, Any], now: float) -> str:
    if row["state"] == "running":
        longest = max(now - r["started"] for r in row["running"])
        text = f"running {fmt.duration(longest)}"
        if len(row["running"]) > 1:
            text += f" (x{len(row['running'])})"
        return text
    return str(row["state"])


def jobs_table(rows: list[dict[str, Any]], now: float, *, wide: bool = True) -> str:
    headers = ["JOB", "STATE", "NEXT", "LEFT", "LAST", "PASSED", "OUTCOME", "TOOK", "FAILS"]
    if wide:
        headers.append("SCHEDULE")
    out = []
    for r in rows:
        last = r["last"] or {}
        cells = [
            r["name"],
            _state(r, now),
            fmt.local_time(r["next"]),
            fmt.relative(r["next"], now) if r["next"] else "-",
            fmt.local_time(last.get("started")),
            fmt.relative(last.get("started"), now) if last else "-",
            last.get("outcome", "-"),
            fmt.duration(last.get("duration")) if last else "-",
            str(r["failures"]),
        ]
        if wide:
            cells.append(r["schedule"])
        out.append(cells)
    text = fmt.table(headers, out)
    notes = [f"  {r['name']}: broken: {fmt.safe(str(r['broken']))}" for r in rows if r["broken"]]
    notes += [
        f"  {r['name']}: last error: {fmt.one_line(r['last']['error'], 100)}"
        for r in rows
        if r["last"] and r["last"].get("error") and r["failures"]
    ]
    return text + ("\n" + "\n".join(notes) if notes else "")


def cmd_jobs(args: argparse.Namespace) -> int:
    code, data = _call(args, "jobs", {"job": args.job} if args.job else None)
    if code != EXIT_OK:
        return code
    if args.json:
        emit(data)
        return EXIT_OK
    if not data["jobs"]:
        print("no jobs scheduled")
        return EXIT_OK
    print(jobs_table(data["jobs"], data["now"]))
    return EXIT_OK


def _executor_summary(figures: dict[str, Any]) -> str:
    """One line of a started executor's figures: "up, 2 workers, 1 processing"."""
    head = [("up" if figures["up"] else "DOWN")] if "up" in figures else []
    rest = [
        f"{value:g} {name.removesuffix('_total')}"
        for name, value in figures.items()
        if name != "up" and isinstance(value, int | float)
    ]
    return ", ".join(head + rest) or "started"


def cmd_status(args: argparse.Namespace) -> int:
    code, data = _call(args, "status")
    if code != EXIT_OK:
        return code
    if args.json:
        emit(data)
        return EXIT_OK
    now = time.time()
    d = data["daemon"]
    state = "stopping" if d["stopping"] else "running"
    print(
        f"taskd {d['version']}: {state} (pid {d['pid']}, {d['loop']}, "
        f"up {fmt.duration(d['uptime'])} since {fmt.local_time(d['started'])})"
    )
    counts = [f"{d['jobs']} scheduled", f"{d['running']} running"]
    counts += [f"{d[k]} {k}" for k in ("paused", "broken", "retiring") if d[k]]
    print(f"  config: {fmt.safe(str(d['config']))}")
    print(f"  state:  {fmt.safe(str(d['state_dir']))}")
    print(f"  socket: {fmt.safe(str(d['socket']))}")
    print(f"  jobs:   {', '.join(counts)}")
    if d.get("pool_degraded"):
        print(f"  pool:   DEGRADED: {fmt.safe(str(d['pool_degraded']))}")
    threads = d.get("threads") or {}
    if threads.get("exhausted"):
        print(f"  threads: EXHAUSTED: {fmt.safe(str(threads['exhausted']))}")
    elif d["stuck_threads"]:
        cap = f", replaced up to {threads['max']} threads" if threads else ""
        print(f"  stuck threads: {d['stuck_threads']} (blocking runs past their timeout{cap})")
    if d["state_write_failing"]:
        print("  state:  WRITES FAILING (runs go on; see the log)")
    for name, figures in (d.get("executors") or {}).items():
        print(f"  {fmt.safe(str(name))}:   {_executor_summary(figures)}")
    fleet = data.get("fleet")
    if fleet:
        print(f"  fleet:  {_fleet_summary(fleet)}")
    print(f"  reload: {_reload_summary(d['last_reload'], now)}")
    for error in (d["last_reload"] or {}).get("errors", []):
        print(f"          {fmt.safe(str(error))}")
    if data["jobs"]:
        print()
        print(jobs_table(data["jobs"], now, wide=False))
    return EXIT_OK


def _fleet_summary(fleet: dict[str, Any]) -> str:
    """This node's view of its fleet: "node h1, database up, clock +0.002 s off it"."""
    db = str(fleet["db"])
    text = f"node {fmt.safe(str(fleet['node']))}, database {db if db == 'up' else db.upper()}"
    text += f", clock {fleet['skew']:+.3f} s off it"
    if fleet.get("claims_lost"):
        text += f", {fleet['claims_lost']} claims lost"
    return text


def _reload_summary(last: dict[str, Any] | None, now: float) -> str:
    if last is None:
        return "none since start"
    when = f"{fmt.local_time(last['at'])} ({fmt.relative(last['at'], now)})"
    if not last["ok"]:
        return f"FAILED {when}; the previous config keeps running:"
    changes = ", ".join(f"{len(last[k])} {k}" for k in ("added", "changed", "removed"))
    return f"ok {when}: {changes}"


# -- actions -------------------------------------------------------------------------------------


def cmd_trigger(args: argparse.Namespace) -> int:
    code, data = _call(
        args, "trigger", {"job": args.job, "wait": args.wait}, timeout=None if args.wait else 30.0
    )
    if code != EXIT_OK:
        return code
    if args.json:
        emit(data)
    elif not args.wait:
        if data["state"] == "queued":
            print(f'{args.job}: queued behind the run in flight (overlap = "queue")')
        else:
            print(f"{args.job}: started run {data['run_id']}")
    else:
        took = fmt.duration(data["duration"])
        attempts = f" after {plural(data['attempts'], 'attempt')}" if data["attempts"] > 1 else ""
        line = f"{args.job}: {data['outcome']} in {took}{attempts} (run {data['run_id']})"
        if data["outcome"] == "succeeded":
            print(line)
            if data["result"] is not None:
                print(json.dumps(data["result"], indent=2))
        else:
            print(f"{line}: {fmt.safe_lines(str(data['error']))}", file=sys.stderr)
    if args.wait and data["outcome"] != "succeeded":
        return EXIT_FAIL
    return EXIT_OK


def _pause(args: argparse.Namespace, cmd: str) -> int:
    code, data = _call(args, cmd, {"job": args.job})
    if code != EXIT_OK:
        return code
    if args.json:
        emit(data)
    elif data["changed"]:
        print(f"{args.job}: {'paused' if data['paused'] else 'resumed'}")
    else:
        print(f"{args.job}: already {'paused' if data['paused'] else 'running on schedule'}")
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    return _pause(args, "pause")


def cmd_resume(args: argparse.Namespace) -> int:
    return _pause(args, "resume")


def cmd_reload(args: argparse.Namespace) -> int:
    code, data = _call(args, "reload", timeout=None)
    if code != EXIT_OK:
        return code
    if args.json:
        emit(data)
        return EXIT_OK if data["ok"] else EXIT_FAIL
    if not data["ok"]:
        print_error_lines(
            [
                "taskd: reload failed; the previous config keeps running "
                f"({plural(len(data['errors']), 'error')}):",
                *(f"  {fmt.safe(str(error))}" for error in data["errors"]),
            ]
        )
        return EXIT_FAIL
    parts = [f"{k} {', '.join(data[k])}" for k in ("added", "changed", "removed") if data[k]]
    print(f"reloaded in {fmt.duration(data['took'])}: {'; '.join(parts) or 'no job changed'}")
    for warning in data["warnings"]:
        print(f"  warning: {fmt.safe(str(warning))}")
    return EXIT_OK
