"""TOML file -> validated, frozen :class:`Config`. Every problem is collected, not just the first.

This checks the config's own shape. Whether a job's ``type`` exists and its ``options`` fit
the job function is checked against the loaded plugins by :mod:`taskd.plugin.resolve`."""

from __future__ import annotations

import difflib
import grp
import os
import re
import sys
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from taskd.config.durations import parse_duration, parse_offset, parse_size
from taskd.config.model import (
    CATCHUPS,
    LOG_FORMATS,
    LOG_LEVELS,
    OVERLAPS,
    Config,
    DaemonConfig,
    JobConfig,
)
from taskd.config.source import open_config, read_open_toml, read_toml
from taskd.config.steps import Steps, finish
from taskd.errors import ConfigError, ConfigIssue

DEFAULT_CONFIG = Path("/etc/taskd/taskd.toml")
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
SCHEDULE_KEYS = ("every", "cron", "at", "on")
DAEMON_KEYS = (
    "plugin_dirs",
    "state_dir",
    "runtime_dir",
    "log_level",
    "log_format",
    "process_workers",
    "thread_workers",
    "thread_workers_max",
    "shutdown_timeout",
    "loop_block_threshold",
    "timezone",
    "metrics_address",
    "control_group",
    "entry_points",
    "disabled_plugins",
    "max_result_size",
    "history_max_runs",
    "history_max_age",
)
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
)
MAX_RETRIES = 100
# One empty table for every job without options (most): a dict each is 64 bytes a job that
# the daemon keeps for its lifetime. Typed Mapping, so nothing may write to it.
NO_OPTIONS: Mapping[str, Any] = {}

T = TypeVar("T")


def suggest(word: str, choices: Any) -> str | None:
    """ "did you mean 'x'?" for the closest choice, or None when nothing is close."""
    options = list(choices)
    by_lower = {c.lower(): c for c in options}
    if word.lower() in by_lower:  # "INFO", "utc": only the case is off
        return f"did you mean {by_lower[word.lower()]!r}?"
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"did you mean {by_lower[close[0]]!r}?" if close else None


def check_timezone(name: str) -> str | None:
    """None if ``name`` is a known IANA zone, else a message with a suggestion."""
    try:
        ZoneInfo(name)
        return None
    except (ZoneInfoNotFoundError, ValueError):
        import zoneinfo

        hint = suggest(name, zoneinfo.available_timezones())
        return f"unknown time zone {name!r}" + (
            f"; {hint}" if hint else '; use an IANA name such as "Europe/Berlin"'
        )


class _Collector:
    """Gathers issues with file and line so one pass reports everything."""

    def __init__(self, file: Path, lines: dict[str, int]) -> None:
        self.file = str(file)
        self.lines = lines
        self.issues: list[ConfigIssue] = []

    def add(self, path: str, message: str, hint: str | None = None) -> None:
        line = self.lines.get(path)
        probe = path
        while line is None and "." in probe:
            probe = probe.rsplit(".", 1)[0]
            line = self.lines.get(probe)
        self.issues.append(ConfigIssue(self.file, path, message, line, hint))

    def unknown_keys(self, table: Mapping[str, Any], prefix: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.add(
                    f"{prefix}.{key}",
                    f"unknown key {key!r} in [{prefix}]",
                    suggest(key, known) or f"known keys: {', '.join(known)}",
                )

    def take(
        self, table: Mapping[str, Any], key: str, prefix: str, conv: Callable[[Any], T], default: T
    ) -> T:
        if key not in table:
            return default
        try:
            return conv(table[key])
        except (ValueError, TypeError) as exc:
            self.add(f"{prefix}.{key}", str(exc))
            return default


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type_name(value)}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type_name(value)}")
    return value


def _int_range(low: int, high: int | None = None) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected a whole number, got {type_name(value)}")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"from {low} to {high}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return conv


def _choice(choices: tuple[str, ...]) -> Callable[[Any], Any]:
    def conv(value: Any) -> Any:
        text = _string(value)
        if text not in choices:
            hint = suggest(text, choices)
            raise ValueError(
                f"must be one of {', '.join(choices)}, got {text!r}" + (f"; {hint}" if hint else "")
            )
        return text

    return conv


def type_name(value: Any) -> str:
    """How a config error names a TOML value's type: "a string", "an array", ..."""
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem found."""
    config, issues, by_job = _read(path)
    if issues or by_job:
        raise ConfigError([*issues, *(i for found in by_job.values() for i in found)])
    return config


def load_config_for_job(path: str | Path, job: str) -> tuple[Config, dict[str, list[ConfigIssue]]]:
    """The config for running one job (``taskd exec``): raises ConfigError for a problem
    outside ``[jobs]`` or in that job's table; the other invalid jobs' problems come back
    beside the config (by job name), which holds only the valid jobs."""
    config, issues, by_job = _read(path)
    own = by_job.pop(job, [])
    if issues or own:
        raise ConfigError([*issues, *own])
    return config, by_job


def job_from_table(name: str, table: Mapping[str, Any], *, file: str = "<jobs>") -> JobConfig:
    """One ``[jobs.<name>]`` table given as a dict (taskd.testing), read exactly as from a
    config file: durations, sizes, bounds, unknown keys. Raises ConfigError naming ``file``."""
    c = _Collector(Path(file), {})
    job = _job(c, name, dict(table), "UTC")
    if c.issues or job is None:
        raise ConfigError(c.issues)
    return job


def _read(path: str | Path) -> tuple[Config, list[ConfigIssue], dict[str, list[ConfigIssue]]]:
    """The config with its valid jobs; the issues outside any job; each invalid job's issues."""
    return finish(_validate(*read_document(path)))


def read_document(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, int]]:
    """The config file's absolute path, its TOML document and its key -> line map: the part
    of :func:`load_config` that reads the file (in a process of its own, see
    taskd.config.source). Raises ConfigError when the file cannot be read or parsed."""
    file = Path(path).expanduser().absolute()
    fd = open_config(file)
    try:
        data, lines = read_open_toml(file, fd)
    finally:
        os.close(fd)
    return file, data, lines


def validate_steps(file: Path, data: dict[str, Any], lines: dict[str, int]) -> Steps[Config]:
    """The rest of :func:`load_config`, on what :func:`read_document` returned, in steps of
    one job (taskd.config.steps): a reload validates on the loop, a slice at a time."""
    config, issues, by_job = yield from _validate(file, data, lines)
    if issues or by_job:
        raise ConfigError([*issues, *(i for found in by_job.values() for i in found)])
    return config


def daemon_settings(path: str | Path) -> DaemonConfig | None:
    """The [daemon] table of a config file that may not pass load_config (refused, or
    invalid elsewhere), invalid values left at their defaults; None when the file cannot be
    read or parsed. For reports that name the plugin folders and state_dir it would use
    (taskd.trust_report); nothing of it is acted on."""
    file = Path(path).expanduser().absolute()
    try:
        data, lines = read_toml(file)
    except ConfigError:
        return None
    return _daemon(_Collector(file, lines), data.get("daemon", {}), file.parent)


def _validate(
    file: Path, data: dict[str, Any], lines: dict[str, int]
) -> Steps[tuple[Config, list[ConfigIssue], dict[str, list[ConfigIssue]]]]:
    c = _Collector(file, lines)
    base = file.parent

    for key in data:
        if key not in ("daemon", "jobs"):
            c.add(
                key,
                f"unknown top-level key {key!r}",
                suggest(key, ("daemon", "jobs"))
                or "the top level has [daemon] and [jobs.<name>] tables",
            )

    daemon = _daemon(c, data.get("daemon", {}), base)
    jobs_table = data.get("jobs", {})
    jobs: dict[str, JobConfig] = {}
    by_job: dict[str, list[ConfigIssue]] = {}
    if not isinstance(jobs_table, dict):
        c.add("jobs", f"expected tables [jobs.<name>], got {type_name(jobs_table)}")
    else:
        for name, table in jobs_table.items():
            before = len(c.issues)
            job = _job(c, name, table, daemon.timezone)
            if len(c.issues) > before:
                by_job[name] = c.issues[before:]
                del c.issues[before:]
            if job is not None:
                jobs[name] = job
            yield
    return Config(path=file, daemon=daemon, jobs=jobs, lines=c.lines), c.issues, by_job


def _path(base: Path) -> Callable[[Any], Path]:
    def conv(value: Any) -> Path:
        text = _string(value)
        if not text:
            raise ValueError("empty path")
        if "\x00" in text:
            raise ValueError("a path cannot contain a NUL character")
        try:
            p = Path(text).expanduser()
        except RuntimeError as exc:  # "~nobody/x"
            raise ValueError(f"cannot expand {text!r}: {exc}") from None
        return p if p.is_absolute() else base / p

    return conv


def _daemon(c: _Collector, table: Any, base: Path) -> DaemonConfig:
    if not isinstance(table, dict):
        c.add("daemon", f"expected a table [daemon], got {type_name(table)}")
        return DaemonConfig()
    c.unknown_keys(table, "daemon", DAEMON_KEYS)
    d = DaemonConfig()
    to_path = _path(base)

    def paths(value: Any) -> tuple[Path, ...]:
        if not isinstance(value, list):
            raise TypeError(f"expected an array of folder paths, got {type_name(value)}")
        return tuple(to_path(v) for v in value)

    def names(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise TypeError(f"expected an array of strings, got {type_name(value)}")
        return tuple(_string(v) for v in value)

    def zone(value: Any) -> str:
        text = _string(value)
        problem = check_timezone(text)
        if problem:
            raise ValueError(problem)
        return text

    def address(value: Any) -> str:
        text = _string(value)
        _host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f'expected "host:port" such as "127.0.0.1:9464", got {text!r}')
        return text

    def group(value: Any) -> str:
        text = _string(value)
        if not text:
            raise ValueError("empty group name; create the group or remove control_group")
        try:
            grp.getgrnam(text)
        except KeyError:
            # Checked at load time so `taskd check` catches it, not the first socket bind.
            raise ValueError(
                f"no group {text!r} on this host; create the group or remove control_group"
            ) from None
        return text

    p = "daemon"
    thread_workers = c.take(table, "thread_workers", p, _int_range(1, 1024), d.thread_workers)
    thread_workers_max = c.take(
        table, "thread_workers_max", p, _int_range(0, 4096), d.thread_workers_max
    )
    if 0 < thread_workers_max < thread_workers:
        c.add(
            f"{p}.thread_workers_max",
            f"must be at least thread_workers ({thread_workers}), got {thread_workers_max}",
            "raise it, or remove it for the default of twice thread_workers",
        )
        thread_workers_max = d.thread_workers_max
    return DaemonConfig(
        plugin_dirs=c.take(table, "plugin_dirs", p, paths, d.plugin_dirs),
        state_dir=c.take(table, "state_dir", p, to_path, d.state_dir),
        runtime_dir=c.take(table, "runtime_dir", p, to_path, d.runtime_dir),
        log_level=c.take(table, "log_level", p, _choice(LOG_LEVELS), d.log_level),
        log_format=c.take(table, "log_format", p, _choice(LOG_FORMATS), d.log_format),
        process_workers=c.take(table, "process_workers", p, _int_range(0, 1024), d.process_workers),
        thread_workers=thread_workers,
        thread_workers_max=thread_workers_max,
        shutdown_timeout=c.take(table, "shutdown_timeout", p, parse_duration, d.shutdown_timeout),
        loop_block_threshold=c.take(
            table, "loop_block_threshold", p, _block_threshold, d.loop_block_threshold
        ),
        timezone=c.take(table, "timezone", p, zone, d.timezone),
        metrics_address=c.take(table, "metrics_address", p, address, d.metrics_address),
        control_group=c.take(table, "control_group", p, group, d.control_group),
        entry_points=c.take(table, "entry_points", p, _bool, d.entry_points),
        disabled_plugins=c.take(table, "disabled_plugins", p, names, d.disabled_plugins),
        max_result_size=c.take(table, "max_result_size", p, parse_size, d.max_result_size),
        history_max_runs=c.take(
            table, "history_max_runs", p, _int_range(1, MAX_HISTORY_RUNS), d.history_max_runs
        ),
        history_max_age=c.take(table, "history_max_age", p, _history_age, d.history_max_age),
    )


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
        line=c.lines.get(p),
    )
    return job if len(c.issues) == before else None


MAX_LOOP_BLOCK_THRESHOLD = 60.0


def _block_threshold(value: Any) -> float:
    seconds = parse_duration(value)
    # Above a minute the report would come after systemd's watchdog or an operator had
    # already acted; it is a diagnosis, not a timeout.
    if not 0 < seconds <= MAX_LOOP_BLOCK_THRESHOLD:
        raise ValueError(
            f'must be more than 0 and at most 60s, got {value!r}; the default is "250ms"'
        )
    return seconds


# A billion rows of history is hundreds of GB: past any sensible setting, and a typo.
MAX_HISTORY_RUNS = 1_000_000_000


def _history_age(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 1:
        raise ValueError(
            f'must be at least "1s", got {value!r}; e.g. "30d" (leave it out to keep runs of any age)'
        )
    return seconds


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 (leave it out for no timeout)")
    return seconds
