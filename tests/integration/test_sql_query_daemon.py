"""sql_query in the real daemon against real PostgreSQL and MariaDB servers (tests/dbservers.py).

Connections are counted on the server (pg_stat_activity by application_name, MariaDB's
processlist by user) across runs, reloads and the stop: one per job while it runs, none
left behind. The password is looked for in everything the daemon wrote."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.dbservers import REPORT_PASSWORD, MariaServer, PgServer
from tests.helpers import REPO, DaemonProc, daemon_table
from tests.integration.test_reload import reload

pytestmark = pytest.mark.timeout(90)

Server = PgServer | MariaServer
PLUGIN = (REPO / "plugins" / "sql_query.py").read_text()
WRONG_PASSWORD = "Wrong-Pw-7c1e-never-logged"


@pytest.fixture(params=["postgres", "mariadb"])
def server(request: pytest.FixtureRequest) -> Server:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def session_ids(server: Server, job: str) -> set[int]:
    if isinstance(server, PgServer):
        return {r[0] for r in server.connections(f"taskd/{job}")}
    return {r[0] for r in server.connections()}


def sessions(server: Server, job: str) -> int:
    return len(session_ids(server, job))


def settle(server: Server, job: str, want: int, timeout: float = 10.0) -> int:
    """The session count once it is ``want`` (closing is asynchronous on the server side)."""
    deadline = time.monotonic() + timeout
    while (n := sessions(server, job)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def sql_job(
    name: str, server: Server, pwfile: Path, query: str, every: str = "200ms", **extra: Any
) -> str:
    lines = [f"[jobs.{name}]", 'type = "sql_query"', f'every = "{every}"']
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.pop("job", {}).items()]
    lines += [f"[jobs.{name}.options]", f'dsn = "{server.dsn()}"', f'query = "{query}"']
    lines.append(f'password_file = "{pwfile}"')
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    return "\n".join(lines) + "\n"


OTHER = """
[jobs.other]
type = "sql_query"
every = "1h"
enabled = false
[jobs.other.options]
dsn = "postgresql://nobody@127.0.0.1:1/none"
query = "SELECT 1"
"""


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    path = tmp_path / "report.pw"
    path.write_text(REPORT_PASSWORD + "\n")
    path.chmod(0o600)
    return path


def more_runs(d: DaemonProc, job: str, n: int, timeout: float = 15.0) -> None:
    have = len(d.events("run", job=job, outcome="succeeded"))
    d.wait_for("run", job=job, outcome="succeeded", count=have + n, timeout=timeout)


def test_connections_across_runs_reloads_and_stop(
    daemon_factory, server: Server, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    q1 = "SELECT count(*) AS n FROM orders"
    q2 = "SELECT sum(amount) AS total FROM orders"
    counts: list[tuple[str, int]] = []
    d: DaemonProc = daemon_factory(
        sql_job("orders", server, pwfile, q1, min_value=3.0), {"sql_query.py": PLUGIN}
    )
    d.start()
    more_runs(d, "orders", 5)
    counts.append(("after 5 runs", settle(server, "orders", 1)))
    first = session_ids(server, "orders")

    # Changed by a reload: the old pool is closed, the next run opens a new one.
    reload(d, sql_job("orders", server, pwfile, q2, max_value=100.0))
    more_runs(d, "orders", 5)
    counts.append(("after a reload that changed the job, 5 runs", settle(server, "orders", 1)))
    second = session_ids(server, "orders")
    assert not first & second  # a new pool's connection

    # Unchanged by a reload: same pool, same connection.
    reload(d, sql_job("orders", server, pwfile, q2, max_value=100.0))
    more_runs(d, "orders", 3)
    counts.append(("after an unchanging reload, 3 runs", settle(server, "orders", 1)))
    assert session_ids(server, "orders") == second

    # Removed by a reload: closed.
    reload(d, OTHER)
    counts.append(("after a reload that removed the job", settle(server, "orders", 0)))

    # Back, then the daemon stops: closed at the stop.
    reload(d, sql_job("orders", server, pwfile, q1))
    more_runs(d, "orders", 3)
    counts.append(("after the job came back, 3 runs", settle(server, "orders", 1)))
    assert d.stop() == 0
    counts.append(("after the daemon stopped", settle(server, "orders", 0)))

    with capsys.disabled():
        print(f"\n{type(server).__name__} sessions of the job: {counts}")
    assert [n for _, n in counts] == [1, 1, 1, 0, 1, 0]
    results = [r for r in d.history("orders") if r["outcome"] == "succeeded"]
    assert len(results) >= 16
    assert d.events("run", job="orders", outcome="failed") == []


def test_password_is_nowhere_in_logs_or_state(
    daemon_factory, server: Server, pwfile: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.pw"
    wrong.write_text(WRONG_PASSWORD)
    config = (
        sql_job("good", server, pwfile, "SELECT id, note FROM orders")
        + sql_job("bad_query", server, pwfile, "SELECT nope FROM orders")
        + sql_job("wrong_pw", server, wrong, "SELECT 1")
    )
    d: DaemonProc = daemon_factory(config, {"sql_query.py": PLUGIN})
    d.start()
    more_runs(d, "good", 3)
    d.wait_for("run", job="bad_query", outcome="failed", count=2, timeout=15)
    failed = d.wait_for("run", job="wrong_pw", outcome="failed", count=2, timeout=15)
    assert "report" in failed[0]["error"]
    assert ("password authentication failed" in failed[0]["error"]) or (
        "Access denied" in failed[0]["error"]
    )
    assert d.stop() == 0

    log = "\n".join(d.raw)
    assert "Access denied" in log or "authentication failed" in log
    stored = b"".join(p.read_bytes() for p in (d.dir / "state").rglob("*") if p.is_file())
    assert b"nope" in stored and b"second" in stored  # the history is there to search
    for secret in (REPORT_PASSWORD, WRONG_PASSWORD):
        assert secret not in log
        assert secret.encode() not in stored


def _sleeping(server: Server) -> list[tuple[Any, ...]]:
    if isinstance(server, PgServer):
        return server.sql(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep(%' "
            "AND pid <> pg_backend_pid()"
        )
    return [r for r in server.connections() if r[2] and "SLEEP(" in r[2]]


def test_the_jobs_timeout_cancels_the_statement_on_the_server(
    daemon_factory, server: Server, pwfile: Path
) -> None:
    sleep = "SELECT pg_sleep(30)" if isinstance(server, PgServer) else "SELECT SLEEP(30)"
    job = sql_job(
        "slow", server, pwfile, sleep, every="1h", job={"timeout": "1500ms"}, statement_timeout=60
    )
    d: DaemonProc = daemon_factory(
        job.replace('every = "1h"', 'on = "startup"'), {"sql_query.py": PLUGIN}
    )
    d.start()
    d.wait_for("run", job="slow", outcome="timed_out", timeout=15)
    deadline = time.monotonic() + 2.5
    while _sleeping(server):
        assert time.monotonic() < deadline, "the statement still runs on the server"
        time.sleep(0.05)
    assert d.stop() == 0
    assert settle(server, "slow", 0) == 0


def test_a_stop_with_a_statement_in_flight_takes_shutdown_timeout_not_more(
    daemon_factory, server: Server, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run is cancelled at shutdown_timeout and its pool closed: closing must not wait
    # for a connection the cancelled run already dropped (aiomysql's release of a closed
    # connection wakes no one waiting in wait_closed: the stop took 5 s more).
    sleep = "SELECT pg_sleep(60)" if isinstance(server, PgServer) else "SELECT SLEEP(60)"
    job = sql_job("slow", server, pwfile, sleep, every="1h", job={"timeout": "3m"})
    config = daemon_table(shutdown_timeout='"2s"') + job.replace('every = "1h"', 'on = "startup"')
    d: DaemonProc = daemon_factory(config, {"sql_query.py": PLUGIN})
    d.start()
    deadline = time.monotonic() + 15
    while not _sleeping(server):
        assert time.monotonic() < deadline, "the statement never started"
        time.sleep(0.05)
    start = time.monotonic()
    assert d.stop(timeout=30) == 0
    took = time.monotonic() - start
    with capsys.disabled():
        print(f"\n{type(server).__name__}: stop with a statement in flight took {took:.1f}s")
    # 2 s of shutdown_timeout, then the cancel, the KILL QUERY and the close: well under
    # the 2 + 5 s it took when the close waited out its own timeout.
    assert took < 5.5, took
    assert d.events("resource_close_timeout") == []
    assert settle(server, "slow", 0) == 0
    assert not _sleeping(server)
