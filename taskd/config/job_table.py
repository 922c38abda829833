"""One [jobs.<name>] table -> JobConfig: schedule, bounds, policies and options checked.
Its problems are collected, not just the first."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from taskd.config.checks import (
    _bool,
    _choice,
    _Collector,
    _int_range,
    _string,
    check_timezone,
    type_name,
)
from taskd.config.durations import parse_duration, parse_offset, parse_size
from taskd.config.model import CATCHUPS, OVERLAPS, SCOPES, JobConfig

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
SCHEDULE_KEYS = ("every", "cron", "at", "on")
JOB_KEYS = (
    "type",
    *SCHEDULE_KEYS,
    "offset",
    "timezone",
    "jitter",
    "timeout",
    "retries",
    "retry_backoff",
    "overlap",
    "catchup",
    "grace",
    "enabled",
    "max_memory",
    "options",
    "scope",
    "executor",
)
MAX_RETRIES = 100
# One empty table for every job without options (most): a dict each is 64 bytes a job that
# the daemon keeps for its lifetime. Typed Mapping, so nothing may write to it.
NO_OPTIONS: Mapping[str, Any] = {}


def _at(value: Any, tz: str) -> float:
    """A TOML datetime (with offset, or local in the job's zone) or an ISO string."""
    if isinstance(value, str):
        if re.fullmatch(r"\s*\d{4}-\d{2}-\d{2}\s*", value):
            # fromisoformat would read a bare date as midnight; a TOML date is refused too
            raise ValueError(
                f"expected a full date-time such as 2026-12-01T09:00:00+01:00, got only a date {value!r}"
            )
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"expected a date-time such as 2026-12-01T09:00:00+01:00, got {value!r}"
            ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=ZoneInfo(tz))
        stamp: float = value.timestamp()
        return stamp
    if isinstance(value, date | time):
        raise TypeError("expected a full date-time (date and time), got only a date or a time")
    raise TypeError(f"expected a date-time, got {type_name(value)}")


def _job(c: _Collector, name: str, table: Any, default_tz: str) -> JobConfig | None:
    p = f"jobs.{name}"
    if not JOB_NAME.fullmatch(name):  # match() would let a trailing newline through
        c.add(
            p,
            f"job name {name!r} is not allowed",
            "use letters, digits, '-', '_' and '.', starting with a letter or digit",
        )
    if not isinstance(table, dict):
        c.add(p, f"expected a table [jobs.{name}], got {type_name(table)}")
        return None
    before = len(c.issues)
    c.unknown_keys(table, p, JOB_KEYS)

    if "type" not in table:
        c.add(f"{p}.type", "missing 'type': the job type a plugin provides (see `taskd plugins`)")
    # Interned: thousands of jobs name a handful of types, one string each is enough.
    jtype = sys.intern(c.take(table, "type", p, _string, ""))

    tz = c.take(table, "timezone", p, _string, default_tz)
    problem = check_timezone(tz)
    if problem and "timezone" in table:
        c.add(f"{p}.timezone", problem)
        tz = default_tz

    given = [k for k in SCHEDULE_KEYS if k in table]
    every = cron = at = None
    schedule: Any = "every"
    if not given:
        c.add(
            p,
            "no schedule",
            'set exactly one of: every = "30s", cron = "0 3 * * *", at = 2026-12-01T09:00:00Z, on = "startup"',
        )
    elif len(given) > 1:
        c.add(
            f"{p}.{given[1]}",
            f"{' and '.join(repr(g) for g in given)} are both set; a job has exactly one schedule",
            "keep one of them",
        )
    else:
        schedule = given[0]
        if schedule == "every":
            every = c.take(table, "every", p, parse_duration, None)
            if every is not None and every <= 0:
                c.add(f"{p}.every", "must be more than 0")
        elif schedule == "cron":
            cron = c.take(table, "cron", p, _string, None)
            if cron is not None:
                from taskd.schedule.triggers import Cron

                try:
                    Cron(cron, ZoneInfo(tz))
                except (ValueError, TypeError) as exc:
                    c.add(f"{p}.cron", f"invalid cron expression {cron!r}: {exc}")
        elif schedule == "at":
            at = c.take(table, "at", p, lambda v: _at(v, tz), None)
        else:
            on = c.take(table, "on", p, _string, None)
            if on is not None and on != "startup":
                c.add(
                    f"{p}.on",
                    f"'on' takes only \"startup\", got {on!r}",
                    "for times use every, cron or at",
                )
            schedule = "startup"

    offset = 0.0
    if "offset" in table and len(given) == 1 and schedule != "every":
        c.add(
            f"{p}.offset",
            f"'offset' applies only to an `every` schedule, and this job has {schedule!r}",
            "put the time into the cron expression or the at time instead",
        )
    elif every is not None:
        offset = c.take(table, "offset", p, lambda v: parse_offset(v, name, every), 0.0)

    options = table.get("options", {})
    if not isinstance(options, dict):
        c.add(f"{p}.options", f"expected a table [jobs.{name}.options], got {type_name(options)}")
        options = {}

    job = JobConfig(
        name=name,
        type=jtype,
        schedule=schedule,
        every=every,
        offset=offset,
        cron=cron,
        at=at,
        timezone=tz,
        jitter=c.take(table, "jitter", p, parse_duration, 0.0),
        timeout=c.take(table, "timeout", p, _positive_duration, None),
        retries=c.take(table, "retries", p, _int_range(0, MAX_RETRIES), 0),
        retry_backoff=c.take(table, "retry_backoff", p, parse_duration, 1.0),
        overlap=c.take(table, "overlap", p, _choice(OVERLAPS), "skip"),
        catchup=c.take(table, "catchup", p, _choice(CATCHUPS), "latest"),
        grace=c.take(table, "grace", p, parse_duration, 60.0),
        enabled=c.take(table, "enabled", p, _bool, True),
        max_memory=c.take(table, "max_memory", p, parse_size, None),
        options=options or NO_OPTIONS,
        scope=c.take(table, "scope", p, _choice(SCOPES), "host"),
        # Interned as type is; whether it names a registered executor that runs this job's
        # kind is checked against the plugins (taskd.plugin.executors).
        executor=c.take(table, "executor", p, _executor_name, None),
    )
    if job.scope == "fleet":
        _fleet_job(c, p, job)
    return job if len(c.issues) == before else None


def _fleet_job(c: _Collector, p: str, job: JobConfig) -> None:
    """What a job with scope = "fleet" may not have (whether [fleet] exists is checked by
    taskd.config.fleet_table.check_scope)."""
    if job.overlap in ("queue", "replace"):
        c.add(
            f"{p}.overlap",
            f'overlap = "{job.overlap}" cannot be used with scope = "fleet": a run on '
            f"another host cannot be queued behind or cancelled",
            'use overlap = "skip" (one run at a time across the fleet), or "allow"',
        )
    if job.schedule == "startup":
        c.add(
            f"{p}.on",
            'on = "startup" cannot be used with scope = "fleet": a host\'s start is no tick '
            "the hosts of the fleet share",
            'give it every, cron or at, or keep scope = "host"',
        )


def _executor_name(value: Any) -> str:
    return sys.intern(_string(value))


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 (leave it out for no timeout)")
    return seconds
