"""``taskd run`` with a [fleet] table whose database cannot be reached: a fleet job never runs
unclaimed (its ticks are skipped as ``fleet_unavailable``), host jobs run as ever, and a
reload that changes [fleet] says a restart is needed."""

from __future__ import annotations

import signal
from collections.abc import Callable

from tests.helpers import TICK_PLUGIN, DaemonProc, free_port


def _config(port: int, lease: str = "3s") -> str:
    return f"""
    [fleet]
    dsn = "postgresql://taskd@127.0.0.1:{port}/taskd"
    node = "h1"
    lease = "{lease}"
    connect_timeout = "1s"

    [jobs.local]
    type = "tick"
    every = "200ms"

    [jobs.shared]
    type = "tick"
    every = "200ms"
    scope = "fleet"
    """


def test_a_fleet_job_without_its_database_never_runs(
    daemon_factory: Callable[..., DaemonProc],
) -> None:
    port = free_port()  # nothing listens: the fleet's database is down
    d = daemon_factory(_config(port), {"tick.py": TICK_PLUGIN}).start()
    d.wait_for("skipped", job="shared", reason="fleet_unavailable", timeout=15)
    d.wait_for("run", job="local", count=3, timeout=15)
    assert d.events("run", job="shared") == []
    d.write_config(_config(port, lease="4s"))
    d.signal(signal.SIGHUP)
    d.wait_for("restart_needed", key="fleet", timeout=10)
    assert d.stop() == 0
    assert d.history("shared") == []  # no history row for a tick never claimed
    assert {r["outcome"] for r in d.history("local")} == {"succeeded"}
