"""Fleet jobs (``scope = "fleet"``) on real hosts: several ``taskd run`` processes share one
PostgreSQL database, and each tick runs on exactly one of them, through a host's death, a
stopped host, a database restart, a skewed clock and a pause (design §4.9).

Skipped until the fleet layer (taskd.fleet) is there; the harness (hosts, fresh database,
password file) is tests/integration/fleet_harness.py, its fixture ``fleet_hosts`` shared
through tests/conftest.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.dbservers import PgServer
from tests.helpers import poll
from tests.integration.fleet_harness import (
    FENCED_WRITE_REFUSED,
    LEASE,
    LISTEN_APP,
    SWEEP,
    TAKEOVER,
    FleetHosts,
)

pytest.importorskip(
    "taskd.fleet.ledger",
    reason="the fleet layer (taskd.fleet, issue 10 F1-F5) is not in this build",
)

Fleet = Callable[..., FleetHosts]
EVERY = 0.1

# Every tick must become exactly one claim, so nothing may skip one on purpose: overlap =
# "allow" (with "skip", a tick whose previous run is still "running" in the database, its
# end not yet written, is skipped fleet-wide as overlap) and catchup = "all" (with "latest",
# a host woken late, as on a loaded CI machine, folds an older tick into the newer one; when
# every host does, that tick is skipped as coalesced everywhere).
FAST = f"""
[jobs.t]
type = "fleet_tick"
every = "{int(EVERY * 1000)}ms"
scope = "fleet"
overlap = "allow"
catchup = "all"
"""


def _window(rows: list[dict[str, Any]], first: float, count: int) -> list[dict[str, Any]]:
    """The scheduled claims of the ``count`` ticks from ``first`` on (µs in the database)."""
    last = first + (count - 1) * EVERY
    return [r for r in rows if r["kind"] == "s" and first - 0.001 <= r["tick"] <= last + 0.001]


def _ticks_after(fleet: FleetHosts, job: str, since: float, count: int) -> list[dict[str, Any]]:
    """Wait until the ``count`` ticks after ``since`` have all ended, and a later one was
    claimed; return the claims of those ``count`` ticks."""
    rows = fleet.wait_claims(job, lambda rows: any(r["tick"] > since for r in rows), timeout=20)
    first = min(r["tick"] for r in rows if r["tick"] > since)
    last = first + (count - 1) * EVERY

    def done(rows: list[dict[str, Any]]) -> bool:
        return any(r["tick"] > last + 0.5 for r in rows) and not any(
            r["state"] == "running" for r in _window(rows, first, count)
        )

    timeout = count * EVERY + 30
    return _window(fleet.wait_claims(job, done, timeout=timeout), first, count)


def _once_each(window: list[dict[str, Any]], count: int, fleet: FleetHosts | None = None) -> None:
    if len(window) != count and fleet is not None:
        pytest.fail(f"{len(window)} claims for {count} ticks; {_why_missing(fleet, window)}")
    assert len(window) == count, f"{len(window)} claims for {count} ticks"
    assert len({r["tick"] for r in window}) == count
    assert len({r["fence"] for r in window}) == count  # one fence per claim
    assert {r["state"] for r in window} == {"succeeded"}


def _why_missing(fleet: FleetHosts, window: list[dict[str, Any]]) -> str:
    """What each host logged about the ticks of the window no host claimed."""
    first = window[0]["tick"]
    have = {round((r["tick"] - first) / EVERY) for r in window}
    missing = [first + k * EVERY for k in range(max(have) + 1) if k not in have]
    said = []
    for tick in missing:
        stamp = datetime.fromtimestamp(tick, UTC).isoformat()
        for host in fleet:
            lines = [
                {k: e.get(k) for k in ("event", "reason", "count", "first", "last", "level")}
                for e in host.events(job="t")
                if e.get("event") != "run"
                and e.get("first", "") <= stamp <= e.get("last", e.get("first", ""))
            ]
            said.append(f"{stamp} {fleet.node(host)}: {lines}")
    return "missing:\n" + "\n".join(said)


def _local_runs(fleet: FleetHosts, job: str, first: float, last: float) -> list[float]:
    """The ticks every host's own history ran in [first, last] (hosts stopped: all written)."""
    return [
        r["scheduled"]
        for host in fleet
        for r in host.history(job)
        if first - 0.001 <= r["scheduled"] <= last + 0.001
    ]


@pytest.mark.timeout(120)
def test_three_hosts_run_each_of_200_ticks_exactly_once(fleet_hosts: Fleet) -> None:
    fleet = fleet_hosts(3, FAST)
    started = time.time()  # every host has logged "started"
    window = _ticks_after(fleet, "t", started, 200)
    _once_each(window, 200, fleet)
    assert {r["owner"] for r in window} <= {"h1", "h2", "h3"}
    assert not any(r["takeovers"] for r in window)
    fleet.stop()
    first, last = window[0]["tick"], window[-1]["tick"]
    # Each run is in the history of the one host that ran it, and of no other.
    local = _local_runs(fleet, "t", first, last)
    assert len(local) == 200 and len(set(local)) == 200
    # The hosts that lost a tick counted it as a skip ("elsewhere"), at debug level.
    assert any(h.events("skipped", job="t", reason="elsewhere") for h in fleet)
    for host in fleet:
        assert all(e["level"] == "debug" for e in host.events("skipped", reason="elsewhere"))


SLOW = """
[jobs.slow]
type = "fleet_slow"
every = "1s"
scope = "fleet"
options = { seconds = 8.0 }
"""


@pytest.mark.timeout(90)
def test_kill_9_of_the_owner_mid_run_is_taken_over_within_lease_and_sweep(
    fleet_hosts: Fleet,
) -> None:
    fleet = fleet_hosts(3, SLOW)
    (run,) = fleet.wait_claims("slow", lambda rows: len(rows) >= 1, timeout=20)[:1]
    owner = fleet[int(run["owner"][1:]) - 1]
    owner.wait_for("fleet_slow_began", timeout=10)
    assert owner.proc is not None
    os.killpg(owner.proc.pid, signal.SIGKILL)  # no goodbye to the database
    killed = time.monotonic()
    others = [h for h in fleet if h is not owner]

    def taken_over() -> dict[str, Any] | None:
        for host in others:
            found = host.events(TAKEOVER, job="slow")
            if found:
                return found[0]
        return None

    # The lease lapses (at most LEASE after the owner's last heartbeat), and the next sweep
    # of a live host takes the run over with a new fence and runs it itself.
    poll(taken_over, timeout=LEASE + SWEEP + 1.5, interval=0.05)
    assert time.monotonic() - killed <= LEASE + SWEEP + 1.5
    rows = fleet.wait_claims(
        "slow",
        lambda rows: any(r["tick"] == run["tick"] and r["takeovers"] == 1 for r in rows),
        timeout=5,
    )
    (now,) = [r for r in rows if r["tick"] == run["tick"] and r["kind"] == run["kind"]]
    assert now["lost_owners"] == [run["owner"]]
    assert now["owner"] != run["owner"] and now["fence"] > run["fence"]
    # ... and it ends there, once.
    rows = fleet.wait_claims(
        "slow",
        lambda rows: any(r["tick"] == run["tick"] and r["state"] == "succeeded" for r in rows),
        timeout=20,
    )
    assert [r["state"] for r in rows if r["tick"] == run["tick"]] == ["succeeded"]


@pytest.mark.timeout(90)
def test_a_run_its_hosts_stop_cancels_is_run_by_another_host(fleet_hosts: Fleet) -> None:
    """shutdown_timeout (5 s) is shorter than the run (8 s): the stop cancels it, and hands
    the tick back to the fleet unended; the other host takes it over and runs it."""
    fleet = fleet_hosts(2, SLOW)
    (run,) = fleet.wait_claims("slow", lambda rows: len(rows) >= 1, timeout=20)[:1]
    owner = fleet[int(run["owner"][1:]) - 1]
    other = fleet[1] if owner is fleet[0] else fleet[0]
    owner.wait_for("fleet_slow_began", timeout=10)
    os.kill(owner.daemon_pid, signal.SIGTERM)
    assert owner.wait_exit(timeout=30) == 0
    assert owner.events("fleet_handed_back", job="slow")
    rows = fleet.wait_claims(
        "slow",
        lambda rows: any(r["tick"] == run["tick"] and r["state"] == "succeeded" for r in rows),
        timeout=30,
    )
    (now,) = [r for r in rows if r["tick"] == run["tick"]]
    assert now["owner"] == fleet.node(other) and now["lost_owners"] == [run["owner"]]
    assert other.events(TAKEOVER, job="slow")


FENCED = """
[jobs.fenced]
type = "fleet_fenced"
every = "1h"
scope = "fleet"
"""


@pytest.mark.timeout(90)
def test_a_stale_owners_fenced_write_is_refused(fleet_hosts: Fleet) -> None:
    """Deterministic, no race with timers: h1's ctx.state write waits on a row lock the
    test holds, inside its block's transaction (which holds h1's claim row: no takeover
    meanwhile); h1 is stopped there. The row lock goes, h1 (stopped) never commits, and the
    database ends its transaction after a lease idle: nothing of h1's block is kept. Then
    h2 takes the run over and its write lands; h1, woken, logs its write refused."""
    fleet = fleet_hosts(2, FENCED)
    h1, h2 = fleet[0], fleet[1]
    fleet.sql("INSERT INTO taskd.state (key, value, fence, job) VALUES ('k', '0', 0, 'fenced')")
    lock = fleet.session()
    try:
        lock.execute("BEGIN")
        lock.execute("SELECT 1 FROM taskd.state WHERE key = 'k' FOR UPDATE")
        assert fleet.cli(h1, "trigger", "fenced").returncode == 0
        h1.wait_for("fleet_fenced_began", timeout=10)
        first = fleet.wait_claims("fenced", lambda rows: len(rows) == 1, timeout=5)[0]
        assert first["owner"] == "h1"
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'taskd-state:h1'"
            " AND wait_event_type = 'Lock'"
        )
        fleet.wait_claims("fenced", lambda _: fleet.sql(waiting)[0][0] >= 1, timeout=10)
        os.kill(h1.daemon_pid, signal.SIGSTOP)  # its lease lapses; its block's write waits
        try:
            lock.execute("COMMIT")  # h1's write goes through; h1, stopped, never commits
            h2.wait_for(TAKEOVER, job="fenced", timeout=2 * LEASE + SWEEP + 10)
            h2.wait_for("fleet_fenced_began", count=1, timeout=10)
            rows = fleet.wait_claims(
                "fenced", lambda rows: rows[0]["state"] != "running", timeout=15
            )
        finally:
            os.kill(h1.daemon_pid, signal.SIGCONT)
    finally:
        lock.close()
    (now,) = rows
    assert now["owner"] == "h2" and now["fence"] > first["fence"]
    value = fleet.sql("SELECT value::text, fence FROM taskd.state WHERE key = 'k'")
    assert value == [(str(now["fence"]), now["fence"])]
    refused = h1.wait_for(FENCED_WRITE_REFUSED, timeout=15)[0]
    assert refused.get("fence") == first["fence"]


RESTART = """
[jobs.r]
type = "fleet_slow"
every = "500ms"
scope = "fleet"
catchup = "latest"
options = { seconds = 1.5 }
"""


@pytest.mark.timeout(90)
def test_postgres_restarted_mid_run(fleet_hosts: Fleet, postgres: PgServer) -> None:
    """The run in flight either keeps its fence and finishes (an outage shorter than its
    lease's local deadline) or is stopped by its own host and taken over after the restart
    under a newer fence; either way its tick ends succeeded once. The ticks of the outage
    are skipped as fleet_unavailable (never run unclaimed), and the job goes on after it."""
    fleet = fleet_hosts(2, RESTART)
    rows = fleet.wait_claims("r", lambda rows: any(r["state"] == "running" for r in rows), 20)
    (inflight,) = [r for r in rows if r["state"] == "running"][:1]
    postgres.stop()
    try:
        for host in fleet:
            host.wait_for("skipped", job="r", reason="fleet_unavailable", timeout=15)
    finally:
        postgres.start()
    restarted = time.time()
    key = (inflight["tick"], inflight["kind"])

    def settled(rows: list[dict[str, Any]]) -> bool:
        ended = [r for r in rows if (r["tick"], r["kind"]) == key and r["state"] != "running"]
        return bool(ended) and any(r["tick"] > restarted and r["state"] != "running" for r in rows)

    rows = fleet.wait_claims("r", settled, timeout=30)
    (same,) = [r for r in rows if (r["tick"], r["kind"]) == key]
    assert same["state"] == "succeeded"
    if same["takeovers"]:
        assert same["fence"] > inflight["fence"]  # stopped by its owner, run again elsewhere
    else:
        assert same["fence"] == inflight["fence"]  # finished under its own claim
    ended = [r for r in rows if r["state"] != "running"]
    assert {r["state"] for r in ended} == {"succeeded"}
    fleet.stop()
    # No tick succeeded on two hosts (a run stopped by a lost lease is in its host's
    # history as cancelled, beside the run that took it over).
    succeeded = [
        r["scheduled"] for host in fleet for r in host.history("r") if r["outcome"] == "succeeded"
    ]
    assert len(succeeded) == len(set(succeeded)), "a tick succeeded on two hosts"


@pytest.mark.timeout(150)
def test_a_skewed_clock_never_runs_a_tick_twice(fleet_hosts: Fleet) -> None:
    """h3's clock is 20 s ahead (libfaketime; asyncio's timers keep real time): it fires
    every tick 20 s early, the database's clock says early, and it never runs one."""
    skewed = {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    fleet = fleet_hosts(3, FAST, env=skewed, wrap={3: ["faketime", "-f", "+20s"]})
    started = time.time()
    window = _ticks_after(fleet, "t", started, 200)
    _once_each(window, 200, fleet)
    early = fleet.sql(
        "SELECT count(*) FROM taskd.claims WHERE job = 't' AND claimed_at < tick - interval '1s'"
    )
    assert early == [(0,)]  # no tick ever ran before its time by the database's clock
    h3 = fleet[2]
    skew = fleet.status(h3).get("fleet", {}).get("skew")
    assert skew is not None and abs(skew - 20) < 2, skew
    assert h3.events("skipped", job="t", reason="clock_skew")
    fleet.stop()
    local = _local_runs(fleet, "t", window[0]["tick"], window[-1]["tick"])
    assert len(local) == 200 and len(set(local)) == 200


@pytest.mark.timeout(90)
def test_pause_on_one_host_stops_the_job_on_all(fleet_hosts: Fleet, postgres: PgServer) -> None:
    fleet = fleet_hosts(3, FAST)
    h1, h2, h3 = fleet
    fleet.wait_claims("t", lambda rows: len(rows) >= 10, timeout=20)
    # h3 loses its LISTEN connection first: it never hears of the pause, and still must not
    # run, because every claim checks the job's flag.
    for (pid,) in postgres.sql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        LISTEN_APP.format(node="h3"),
        db="postgres",
    ):
        postgres.sql("SELECT pg_terminate_backend($1)", pid, db="postgres")
    result = fleet.cli(h2, "pause", "t")
    assert result.returncode == 0, result.stderr
    # The pause is on record in the database before the command answers: no claim after it.
    count = len(fleet.claims("t"))
    time.sleep(10 * EVERY)  # ten ticks on every host
    assert len(fleet.claims("t")) == count
    for host in (h1, h3):
        fleet.wait_claims("t", lambda _, h=host: fleet.job_status(h, "t")["paused"], timeout=10)
    result = fleet.cli(h3, "resume", "t")
    assert result.returncode == 0, result.stderr
    fleet.wait_claims("t", lambda rows: len(rows) >= count + 5, timeout=20)
