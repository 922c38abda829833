"""``taskd history``: past runs, read straight from the state database (no daemon needed, and
safe while one runs: the database is opened read-only, see taskd.state.history)."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from taskd.cli import fmt
from taskd.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    emit,
    locate_daemon_dirs,
    no_such_job,
    path_exists,
    plural,
)

if TYPE_CHECKING:
    from taskd.config.model import Config, FleetConfig

MIN_DETAIL = 24  # the RESULT/ERROR column never gets narrower than this, however tight
FLEET_KEYS = ("owner", "fence", "takeovers", "lost_owners")  # a fleet row's, in --json


# -- the command -------------------------------------------------------------------------------


def cmd_history(args: argparse.Namespace) -> int:
    from taskd.errors import StateError
    from taskd.state.history import NoStateDatabase, read_history

    dirs = locate_daemon_dirs(args)
    if dirs.config_error is not None and not args.state_dir and path_exists(dirs.config_path):
        n = len(dirs.config_error.issues)
        print(
            f"taskd: warning: {dirs.config_path} has {plural(n, 'error')} (see `taskd check`); "
            f"reading the history in {dirs.state_dir}",
            file=sys.stderr,
        )
    fleet = _fleet_job(args, dirs.config)
    if fleet is not None:
        return _fleet_history(args, fleet)
    db_path = dirs.state_dir / "state.db"
    try:
        rows = read_history(
            db_path, job=args.job, limit=args.n, failed=args.failed, since=args.since
        )
        if not rows and args.job is not None and dirs.config is not None and not args.state_dir:
            ever = read_history(db_path, job=args.job, limit=1)
            if not ever and args.job not in dirs.config.jobs:
                return no_such_job(args.job, dirs.config.jobs, dirs.config_path)
    except NoStateDatabase as exc:
        print(f"taskd: {exc} (state_dir comes from {dirs.origin})", file=sys.stderr)
        return EXIT_FAIL
    except StateError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    rows.reverse()  # oldest first: the newest ends up at the bottom, next to the prompt
    if args.json:
        emit([json_row(r) for r in rows])
    elif not rows:
        print("no runs" + _filters(args))
    else:
        print(render(rows, width=shutil.get_terminal_size((120, 24)).columns))
    return EXIT_OK


def _fleet_job(args: argparse.Namespace, config: Config | None) -> FleetConfig | None:
    """The [fleet] table to read ``args.job``'s history from: a fleet job, without --local
    or --state-dir (both ask for this host's own)."""
    if args.job is None or args.local or args.state_dir or config is None:
        return None
    job = config.jobs.get(args.job)
    if job is None or job.scope != "fleet":
        return None
    return config.fleet


def _fleet_history(args: argparse.Namespace, cfg: FleetConfig) -> int:
    try:
        from taskd.fleet.conn import FleetDown
        from taskd.fleet.history import read_fleet_history
    except ImportError as exc:  # asyncpg missing: the fleet extra is not installed
        print(f"taskd: {exc}; install taskd[fleet], or use --local", file=sys.stderr)
        return EXIT_FAIL
    try:
        rows = read_fleet_history(cfg, args.job, limit=args.n, failed=args.failed, since=args.since)
    except FleetDown as exc:
        print(f"taskd: {exc}; --local shows this host's own history of it", file=sys.stderr)
        return EXIT_FAIL
    rows.reverse()
    if args.json:
        emit([{**json_row(r), **{k: r[k] for k in FLEET_KEYS}} for r in rows])
    elif not rows:
        print("no runs" + _filters(args) + " in the fleet's database")
    else:
        print(render(rows, width=shutil.get_terminal_size((120, 24)).columns))
    return EXIT_OK


def _filters(args: argparse.Namespace) -> str:
    said = []
    if args.job is not None:
        said.append(f"of {args.job!r}")
    if args.failed:
        said.append("that failed")
    if args.since is not None:
        said.append(f"since {fmt.local_time(args.since)}")
    return (" " + " ".join(said)) if said else ""


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """One run for ``--json``: everything read_history gives, nothing abbreviated."""
    from taskd.state.history import is_truncated

    return {
        "run_id": row["run_id"],
        "job": row["job"],
        "cause": row["cause"],
        "outcome": row["outcome"],
        "attempts": row["attempts"],
        "scheduled": row["scheduled"],
        "scheduled_at": _iso(row["scheduled"]),
        "started": row["started"],
        "started_at": _iso(row["started"]),
        "late": row["late"],
        "duration": row["duration"],
        "error": row["error"],
        "result": row["result"],
        "result_truncated": is_truncated(row["result"]),
    }


def render(rows: Sequence[dict[str, Any]], *, width: int) -> str:
    """The text table of ``rows`` (in the order given) for a terminal ``width`` cells wide."""
    tries = any((r["attempts"] or 1) > 1 for r in rows)
    fleet = bool(rows) and "owner" in rows[0]  # the fleet's rows (taskd.fleet.history)
    headers = ["STARTED", "JOB", "RUN", "CAUSE", "OUTCOME", "TOOK"]
    right = {5}
    if fleet:
        headers[2:3] = ["OWNER", "FENCE"]
        right = {3, 6}
    if tries:
        headers.append("TRIES")
        right.add(len(headers) - 1)
    cells: list[list[str]] = []
    for r in rows:
        run = [r["owner"], str(r["fence"])] if fleet else [r["run_id"]]
        line = [
            fmt.local_time(r["started"]),
            r["job"],
            *run,
            r["cause"],
            r["outcome"],
            fmt.duration(r["duration"]),
        ]
        if tries:
            line.append(str(r["attempts"]))
        cells.append(line)
    used = sum(
        max(fmt.text_width(c) for c in [h, *(line[i] for line in cells)])
        for i, h in enumerate(headers)
    )
    room = max(MIN_DETAIL, width - used - len(fmt.GAP) * len(headers))
    headers.append("RESULT/ERROR")
    for r, line in zip(rows, cells, strict=True):
        line.append(_detail(r, room))
    return fmt.table(headers, cells, right=right)


def _detail(row: dict[str, Any], width: int) -> str:
    if row["error"]:
        return fmt.one_line(row["error"], width)
    if row["outcome"] == "succeeded" and row["result"] is not None:
        return fmt.json_value(row["result"], width)
    return ""
