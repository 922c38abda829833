"""``taskd history``'s options and ``--since``: the light part of taskd.cli.history, which
taskd.cli's parser needs for every command (``taskd run`` included, whose start-up must not
import the history's table rendering and the config validation first)."""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timedelta

from taskd.config.durations import parse_duration

DEFAULT_COUNT = 20

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

A fleet job (scope = "fleet") shows the fleet's record of its runs, read from the
fleet's database through the config's [fleet] table, with OWNER (the host that ran
it) and FENCE columns; --local shows this host's own history of it instead.

The state_dir comes from --state-dir, else the config (-c, $TASKD_CONFIG, the
default), read as written when it is invalid. Exit codes: 0 (also when no run
matches), 1 no state database, a fleet database that cannot be reached, or a job
name known to neither the history nor a valid config, 2 usage."""


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
    p.add_argument(
        "--local",
        action="store_true",
        help="a fleet job: this host's own history, not the fleet's (from its database)",
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
