"""Operator commands on fleet jobs (real `taskd run` hosts, the session's PostgreSQL): a pause
is on record fleet-wide before the command answers, or not made at all when the fleet's
database is down; status shows the running claim's owner and fence and the node's state."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.dbservers import PgServer
from tests.integration.fleet_harness import FleetHosts

SLOW = """
[jobs.s]
type = "fleet_slow"
every = "1s"
scope = "fleet"
options = { seconds = 30.0 }
"""


@pytest.mark.timeout(90)
def test_pause_with_the_database_down_is_refused_and_changes_nothing(
    fleet_hosts: Callable[..., FleetHosts], postgres: PgServer
) -> None:
    fleet = fleet_hosts(1, SLOW)
    (h1,) = fleet
    rows = fleet.wait_claims("s", lambda rows: bool(rows), timeout=20)
    # Status: the running claim's owner and fence, and this node's view of the fleet.
    status = fleet.status(h1)
    assert status["fleet"]["node"] == "h1" and status["fleet"]["db"] == "up"
    (row,) = [j for j in status["jobs"] if j["name"] == "s"]
    assert row["scope"] == "fleet"
    assert (row["fleet"]["owner"], row["fleet"]["fence"]) == ("h1", rows[0]["fence"])
    postgres.stop()
    try:
        h1.wait_for("fleet_db_down", timeout=15)
        result = fleet.cli(h1, "pause", "s")
        assert result.returncode != 0
        assert "was not made" in result.stderr and "fleet database unreachable" in result.stderr
        assert fleet.job_status(h1, "s")["paused"] is False
    finally:
        postgres.start()
    h1.wait_for("fleet_db_up", timeout=40)
    assert fleet.cli(h1, "pause", "s").returncode == 0
    assert fleet.sql("SELECT paused FROM taskd.jobs WHERE job = 's'") == [(True,)]
    assert fleet.job_status(h1, "s")["paused"] is True
