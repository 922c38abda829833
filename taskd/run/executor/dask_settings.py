"""``[dask]``, read and checked: the dask executor's settings (its own table, as SPEC §2
gives it, not ``[executors.dask]``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from taskd.config.checks import suggest
from taskd.config.durations import parse_duration
from taskd.run.executor._base import Problem

KEYS = ("scheduler", "workers", "connect_timeout")
MAX_WORKERS = 256
MAX_CONNECT_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class DaskSettings:
    scheduler: str  # "local" or "tcp://host:port"
    workers: int
    connect_timeout: float

    @property
    def local(self) -> bool:
        return self.scheduler == "local"


def read_settings(
    table: Mapping[str, Any], default_workers: int
) -> tuple[DaskSettings, list[Problem]]:
    """``[dask]`` as settings, and its problems (keys relative to the table)."""
    problems: list[Problem] = []
    for key in table:
        if key not in KEYS:
            problems.append(
                (key, f"unknown key {key!r} in [dask]", suggest(key, KEYS) or ", ".join(KEYS))
            )
    scheduler = table.get("scheduler")
    if scheduler is None:
        problems.append(
            (
                "scheduler",
                "missing 'scheduler'",
                'set scheduler = "local" (a cluster taskd starts) or "tcp://host:8786"',
            )
        )
        scheduler = "local"
    elif not isinstance(scheduler, str) or not (scheduler == "local" or _tcp_address(scheduler)):
        problems.append(
            (
                "scheduler",
                f'expected "local" or a tcp://host:port address, got {scheduler!r}',
                'e.g. scheduler = "tcp://dask-scheduler:8786"',
            )
        )
        scheduler = "local"
    workers = table.get("workers", default_workers)
    if "workers" in table and scheduler != "local":
        problems.append(
            ("workers", "'workers' applies to scheduler = \"local\" only", "remove workers")
        )
    if isinstance(workers, bool) or not isinstance(workers, int):
        problems.append(("workers", f"expected a whole number, got {workers!r}", None))
        workers = default_workers
    elif not 1 <= workers <= MAX_WORKERS:
        problems.append(("workers", f"must be from 1 to {MAX_WORKERS}, got {workers}", None))
        workers = default_workers
    connect_timeout = 10.0
    if "connect_timeout" in table:
        try:
            connect_timeout = parse_duration(table["connect_timeout"])
            if connect_timeout <= 0:
                raise ValueError("must be more than 0")
            if connect_timeout > MAX_CONNECT_TIMEOUT:
                # A scheduler silent for that long is down: runs would wait for it instead.
                raise ValueError(f"must be at most 10m, got {table['connect_timeout']!r}")
        except (ValueError, TypeError) as exc:
            problems.append(("connect_timeout", str(exc), None))
            connect_timeout = 10.0
    return DaskSettings(scheduler, workers, connect_timeout), problems


def _tcp_address(text: str) -> bool:
    """``tcp://host:port``: a port from 1 to 65535, and a host name or address (IPv6 in
    brackets) of the characters those may have. What distributed would take only to fail
    at the first run (no port, spaces) is a config error instead."""
    host, colon, port = text.removeprefix("tcp://").rpartition(":")
    if not text.startswith("tcp://") or not colon or not host or not host.isascii():
        return False
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return False
    if host.startswith("[") and host.endswith("]"):
        return len(host) > 2 and all(c in "0123456789abcdefABCDEF:.%" for c in host[1:-1])
    return all(c.isalnum() or c in "-._" for c in host)
