"""Operator commands on fleet jobs (real `taskd run` hosts, the session's PostgreSQL): a pause
is on record fleet-wide before the command answers, or not made at all when the fleet's
database is down; status shows the running claim's owner and fence and the node's state."""

from __future__ import annotations

import json
import signal
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
    text = fleet.cli(h1, "status").stdout
    assert "fleet:  node h1, database up, clock " in text
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


FAST = """
[jobs.t]
type = "fleet_tick"
every = "100ms"
scope = "fleet"
"""


@pytest.mark.timeout(90)
def test_history_of_a_fleet_job_is_the_fleets(
    fleet_hosts: Callable[..., FleetHosts], postgres: PgServer
) -> None:
    fleet = fleet_hosts(2, FAST)
    h1, h2 = fleet
    fleet.wait_claims("t", lambda rows: sum(r["state"] == "succeeded" for r in rows) >= 10, 20)
    result = fleet.cli(h1, "history", "t", "-n", "5", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 5
    claims = {r["fence"]: r for r in fleet.claims("t")}
    for row in rows:  # each is the fleet's row of that fence, whichever host ran it
        claim = claims[row["fence"]]
        assert row["owner"] == claim["owner"] and row["outcome"] == claim["state"]
        assert row["scheduled"] == pytest.approx(claim["tick"], abs=1e-6)
    text = fleet.cli(h2, "history", "t", "-n", "3")
    assert text.returncode == 0 and "OWNER" in text.stdout and "FENCE" in text.stdout
    # --local: this host's own history (its runs only, with run ids).
    local = json.loads(fleet.cli(h1, "history", "t", "--local", "--json").stdout)
    assert local and all("owner" not in r for r in local)
    postgres.stop()
    try:
        down = fleet.cli(h1, "history", "t")
        assert down.returncode == 1
        assert "fleet database unreachable" in down.stderr and "--local" in down.stderr
    finally:
        postgres.start()


@pytest.mark.timeout(60)
def test_the_first_fleet_job_added_by_a_reload_says_restart(
    fleet_hosts: Callable[..., FleetHosts],
) -> None:
    fleet = fleet_hosts(1, '[jobs.local]\ntype = "fleet_tick"\nevery = "1h"\n')
    (h1,) = fleet
    assert fleet.status(h1)["fleet"] is None  # no fleet job: no fleet ledger, no asyncpg
    h1.config_path.write_text(h1.config_path.read_text() + FAST)
    h1.signal(signal.SIGHUP)
    (said,) = h1.wait_for("restart_needed", key="fleet", timeout=10)
    assert "first fleet job" in said["hint"]
    h1.wait_for("skipped", job="t", reason="fleet_unavailable", timeout=10)
