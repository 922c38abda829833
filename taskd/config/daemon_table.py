"""The [daemon] table -> DaemonConfig: every setting checked, invalid ones left at their
defaults with an issue recorded."""

from __future__ import annotations

import grp
from collections.abc import Callable
from pathlib import Path
from typing import Any

from taskd.config.checks import (
    _bool,
    _choice,
    _Collector,
    _int_range,
    _string,
    check_timezone,
    type_name,
)
from taskd.config.durations import parse_duration, parse_size
from taskd.config.model import LOG_FORMATS, LOG_LEVELS, DaemonConfig

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
