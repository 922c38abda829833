"""``taskd history``: past runs, read straight from the state database (no daemon needed, and
safe while one runs: the database is opened read-only, see taskd.state.history)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

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
from taskd.config.durations import parse_duration

DEFAULT_COUNT = 20
MIN_DETAIL = 24  # the RESULT/ERROR column never gets narrower than this, however tight

EPILOG = """\
Shows the newest N runs that match, oldest first, so the newest is at the
bottom (as journalctl does); --json lists the same runs in the same order,
each in full (the whole result and error, times as epoch seconds and ISO 8601
UTC). STARTED is local time. TOOK is how long the run took, all attempts
included; a TRIES column appears when a run in the list needed more than one
attempt. RESULT/ERROR is the error of a run that did not succeed, else what
the job returned, abbreviated to fit the terminal.

--since takes how long ago ("30m", "1h", "2d", "1h30m") or a date or time in
ISO 8601 ("2026-12-02", "2026-12-02T14:00", "2026-12-02 14:00:00+01:00"; local
time unless it has an offset), or "today" / "yesterday".

The state_dir comes from --state-dir, else the config (-c, $TASKD_CONFIG, the
default), read as written when it is invalid. Exit codes: 0 (also when no run
matches), 1 no state database or a job name known to neither the history nor a
valid config, 2 usage."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``history`` subcommand's options (the parser already has ``-c``)."""
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("job", nargs="?", help="only this job's runs")
    p.add_argument(
        "-n",
        type=int,
        default=DEFAULT_COUNT,
        help=f"how many runs, the newest (default {DEFAULT_COUNT})",
    )
    p.add_argument(
        "--failed",
        action="store_true",
        help="only runs that did not succeed (failed, timed out, interrupted, cancelled)",
    )
    p.add_argument(
        "--since",
        type=_since_arg,
        metavar="WHEN",
        help='only runs started since WHEN: "1h" (ago), "2d", "2026-12-02T14:00", "today"',
    )
    p.add_argument("--json", action="store_true", help="full rows as a JSON array")
    p.add_argument("--state-dir", metavar="DIR", help="read this state_dir instead of the config's")


# -- --since -----------------------------------------------------------------------------------


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds from a ``--since`` value: a duration meaning that long before ``now``
    ("1h", "30m", "2d", optionally followed by "ago"), an ISO 8601 date or date-time (naive
    means local time), or "today" / "yesterday" (local midnight). Raises ValueError."""
    now = time.time() if now is None else now
    value = text.strip()
    word = value.lower()
    if word in ("today", "yesterday"):
        midnight = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
        if word == "yesterday":
            # Naive local arithmetic: a day with a DST change is still "the day before".
            midnight -= timedelta(days=1)
        return midnight.timestamp()
    ago = word.removesuffix("ago").strip()
    if ago[:1].isdigit():
        try:
            return now - parse_duration(ago)
        except ValueError:
            pass  # perhaps a date: "2026-12-02" starts with a digit too
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f'cannot read {text!r} as a time: give how long ago ("30m", "1h", "2d"), '
            f'an ISO 8601 date or time ("2026-12-02", "2026-12-02T14:00", local time unless '
            f'it has an offset such as "Z" or "+01:00"), "today" or "yesterday"'
        ) from None
    return when.timestamp()  # a naive datetime is taken as local time here


def _since_arg(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    headers = ["STARTED", "JOB", "RUN", "CAUSE", "OUTCOME", "TOOK"]
    right = {5}
    if tries:
        headers.append("TRIES")
        right.add(6)
    cells: list[list[str]] = []
    for r in rows:
        line = [
            fmt.local_time(r["started"]),
            r["job"],
            r["run_id"],
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
