"""The [fleet] table -> FleetConfig: the database the hosts of a fleet share, this host's name
in it, and the claim timings. Only read when the table is there; without it no job may have
``scope = "fleet"`` (checked in :func:`check_scope`)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from taskd.config.checks import _choice, _Collector, _int_range, _string, type_name
from taskd.config.daemon_table import _path
from taskd.config.durations import format_duration, parse_duration
from taskd.config.model import ON_OWNER_LOST, FleetConfig, JobConfig
from taskd.config.secrets import SecretKeys, dsn_without_password, one_source

FLEET_KEYS = (
    "dsn",
    "password_file",
    "password_env",
    "node",
    "lease",
    "sweep",
    "claim_window",
    "on_owner_lost",
    "max_takeovers",
    "connect_timeout",
)
# A node name is written into every claim and shown by status and history: a plain name,
# as a host name is (no spaces, quotes or slashes to escape anywhere).
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MIN_LEASE, MAX_LEASE = 3.0, 3600.0
MIN_SWEEP = 0.1
MIN_CONNECT_TIMEOUT, MAX_CONNECT_TIMEOUT = 0.1, 300.0
MAX_TAKEOVERS = 100
EXAMPLE_DSN = 'dsn = "postgresql://taskd@db.internal/taskd"'
_KEYS = SecretKeys(dsn="the DSN", file="password_file", env="password_env")


def _fleet(c: _Collector, table: Any, base: Path) -> FleetConfig | None:
    """The [fleet] table (``table`` None: there is none). None when it is missing or too
    broken to use (its issues are recorded)."""
    if table is None:
        return None
    p = "fleet"
    if not isinstance(table, dict):
        c.add(p, f"expected a table [fleet], got {type_name(table)}")
        return None
    c.unknown_keys(table, p, FLEET_KEYS)
    before = len(c.issues)
    dsn = c.take(table, "dsn", p, _dsn, "")
    if "dsn" not in table:
        c.add(
            f"{p}.dsn",
            "missing 'dsn': the PostgreSQL database the hosts of the fleet share",
            f"add {EXAMPLE_DSN}; the password goes in password_file or password_env",
        )
    password_file = c.take(table, "password_file", p, _path(base), None)
    password_env = c.take(table, "password_env", p, _env_name, None)
    try:
        one_source(None if password_file is None else str(password_file), password_env, _KEYS)
    except ValueError as exc:
        c.add(f"{p}.password_env", str(exc), "keep the one the password is in")
    node = c.take(table, "node", p, _node, None)
    if node is None and "node" not in table:
        node = socket.gethostname()
        if not NODE_NAME.fullmatch(node):
            c.add(
                f"{p}.node",
                f"this host's name {node!r} is no plain name the fleet can use",
                'set node = "web-3": letters, digits, "-", "_" and ".", at most 63',
            )
    lease = c.take(table, "lease", p, _bounded("lease", MIN_LEASE, MAX_LEASE), 30.0)
    sweep = _sweep(c, table, p, lease)
    fleet = FleetConfig(
        dsn=dsn,
        password_file=password_file,
        password_env=password_env,
        node=node or "",
        lease=lease,
        sweep=sweep,
        claim_window=c.take(table, "claim_window", p, _bounded("claim_window", 1.0, None), 3600.0),
        on_owner_lost=c.take(table, "on_owner_lost", p, _choice(ON_OWNER_LOST), "retry"),
        max_takeovers=c.take(table, "max_takeovers", p, _int_range(0, MAX_TAKEOVERS), 3),
        connect_timeout=c.take(
            table,
            "connect_timeout",
            p,
            _bounded("connect_timeout", MIN_CONNECT_TIMEOUT, MAX_CONNECT_TIMEOUT),
            5.0,
        ),
    )
    return fleet if len(c.issues) == before else None


def default_sweep(lease: float) -> float:
    """lease/6, at least 1 s and at most lease/2: a lost owner's run is taken over within
    lease + sweep."""
    return min(max(lease / 6, 1.0), lease / 2)


def _sweep(c: _Collector, table: dict[str, Any], p: str, lease: float) -> float:
    sweep = c.take(table, "sweep", p, _bounded("sweep", MIN_SWEEP, None), None)
    if sweep is None:
        return default_sweep(lease)
    if sweep > lease / 2:
        c.add(
            f"{p}.sweep",
            f"must be at most half the lease ({format_duration(lease / 2)}), got "
            f"{format_duration(sweep)}",
            "a lost owner's run is taken over within lease + sweep; leave sweep out for lease/6",
        )
    return sweep


def check_scope(c: _Collector, job: JobConfig, fleet: FleetConfig | None) -> None:
    """A job with ``scope = "fleet"`` needs the [fleet] table (its own table's checks are
    in job_table.py)."""
    if job.scope == "fleet" and fleet is None:
        c.add(
            f"jobs.{job.name}.scope",
            'scope = "fleet" needs a [fleet] table, and there is none (or it is invalid)',
            f'add a [fleet] table with dsn ({EXAMPLE_DSN}), or use scope = "host"',
        )


def _dsn(value: Any) -> str:
    text = _string(value)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f"must start with postgresql:// or postgres:// (the fleet shares a PostgreSQL "
            f"database), got {scheme + '://' if scheme else 'no scheme'}"
        )
    dsn_without_password(text, _KEYS)
    return text


def _env_name(value: Any) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise ValueError(f"expected the name of an environment variable, got {text!r}")
    return text


def _node(value: Any) -> str:
    text = _string(value)
    if not NODE_NAME.fullmatch(text):
        raise ValueError(
            f'expected a plain name such as "web-3" (letters, digits, "-", "_" and ".", at '
            f"most 63, starting with a letter or digit), got {text!r}"
        )
    return text


def _bounded(key: str, low: float, high: float | None) -> Callable[[Any], float]:
    def conv(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < low or (high is not None and seconds > high):
            span = f"at least {format_duration(low)}"
            if high is not None:
                span = f"from {format_duration(low)} to {format_duration(high)}"
            raise ValueError(f"{key} must be {span}, got {value!r}")
        return seconds

    return conv
