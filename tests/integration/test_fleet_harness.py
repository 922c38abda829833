"""The fleet tests' harness itself (tests/integration/fleet_harness.py), which runs without the
fleet layer: n hosts on one config with their own state and control socket, a fresh database
the fleet's login owns (its password from the file the hosts get), and a host run under
faketime whose clock alone is skewed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import datetime

import pytest

from tests.dbservers import FLEET_PASSWORD, FLEET_USER
from tests.helpers import DaemonProc
from tests.integration.fleet_harness import FleetHosts

HOST_JOB = """
[jobs.local]
type = "fleet_tick"
every = "100ms"
"""


def test_hosts_share_a_fresh_database_and_keep_their_own_state(
    fleet_hosts: Callable[..., FleetHosts],
) -> None:
    fleet = fleet_hosts(2, HOST_JOB)
    # A fresh database, owned by the fleet's login, empty until taskd makes its tables.
    assert fleet.sql(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", fleet.db
    ) == [(FLEET_USER,)]
    for host in fleet:
        assert f'password_file = "{fleet.password_file}"' in host.config_path.read_text()
    assert fleet.password_file.read_text().splitlines()[0] == FLEET_PASSWORD
    assert fleet.password_file.stat().st_mode & 0o077 == 0

    async def login() -> int:
        import asyncpg

        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=fleet.pg.port,
            user=FLEET_USER,
            password=FLEET_PASSWORD,
            database=fleet.db,
            timeout=10,
        )
        try:
            value: int = await conn.fetchval("SELECT 1")
            return value
        finally:
            await conn.close()

    assert asyncio.run(login()) == 1
    for i, host in enumerate(fleet, start=1):
        assert f'node = "h{i}"' in host.config_path.read_text()
        host.wait_for("run", job="local", count=3, timeout=15)  # a host job: every host runs it
        assert fleet.job_status(host, "local")["name"] == "local"  # its own control socket
    fleet.stop()
    dbs = {host.dir / "state" / "state.db" for host in fleet}
    assert len(dbs) == 2 and all(db.exists() for db in dbs)
    assert all(host.history("local") for host in fleet)


def test_a_host_under_faketime_has_its_clock_skewed(
    fleet_hosts: Callable[..., FleetHosts],
) -> None:
    if not any(
        os.access(os.path.join(d, "faketime"), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
    ):
        pytest.fail("faketime is not installed: apt-get install faketime (.ci/run does)")
    fleet = fleet_hosts(
        2, HOST_JOB, env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"}, wrap={2: ["faketime", "-f", "+20s"]}
    )
    h1, h2 = fleet
    assert h1.daemon_pid == h1.pid
    assert h2.daemon_pid != h2.pid  # taskd runs as faketime's child

    def stamp(host: DaemonProc) -> float:
        line = host.wait_for("run", job="local", timeout=15)[-1]
        return datetime.fromisoformat(line["timestamp"]).timestamp()

    ahead = stamp(h2) - stamp(h1)
    assert 15 < ahead < 25, ahead
    fleet.stop()
    assert h2.proc is not None and h2.proc.returncode is not None
