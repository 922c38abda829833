"""The fleet tests' harness (issue 10): ``n`` real ``taskd run`` hosts on one config, each with
its own state_dir and runtime_dir and ``[fleet] node = "h{i}"``, sharing a fresh PostgreSQL
database per test (tests/dbservers.py ``PgServer.fleet_db``).

Not a test module: tests/integration/test_fleet.py imports the ``fleet_hosts`` fixture from
here. The names below that the fleet code defines (log events, status keys, the LISTEN
connection's application_name) are the design's (/work/notes/issue10-design.md §4); they are
constants here so the tests follow the code in one place if it names them otherwise."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.dbservers import FLEET_PASSWORD, PgServer
from tests.helpers import DaemonProc, daemon_table, poll, run_cli

T = TypeVar("T")

# What the fleet code logs and shows (design §4.4-§4.7).
TAKEOVER = "fleet_takeover"  # a sweep took a lost owner's run over (job, tick, fence)
FENCED_WRITE_REFUSED = "fenced_write_refused"  # a stale owner's write to taskd.state
LISTEN_APP = "taskd-listen:{node}"  # application_name of a node's LISTEN connection

# Lease and sweep short enough that a takeover comes within a few seconds.
LEASE, SWEEP = 3.0, 0.5

# The job types the fleet tests run (a drop-in plugin on every host).
FLEET_PLUGIN = '''
import asyncio
import os

import taskd


async def fleet_tick(ctx) -> dict:
    """A fast run: which fence it ran under, and on which host process."""
    return {"fence": ctx.fence, "pid": os.getpid()}


async def fleet_slow(ctx, seconds: float = 5.0) -> dict:
    """A run long enough to kill, stop or cut off its host in the middle of."""
    ctx.log.info("fleet_slow_began", fence=ctx.fence)
    await asyncio.sleep(seconds)
    return {"fence": ctx.fence}


async def fleet_fenced(ctx) -> int:
    """A fenced write to the fleet's shared state: key "k" gets this run's fence."""
    ctx.log.info("fleet_fenced_began", fence=ctx.fence)
    async with ctx.state.locked() as state:
        state["k"] = ctx.fence
    return ctx.fence


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("fleet_tick", fleet_tick),
        taskd.JobType("fleet_slow", fleet_slow),
        taskd.JobType("fleet_fenced", fleet_fenced),
    ]
'''


def fleet_table(node: str, dsn: str, password_file: Path) -> str:
    return (
        "[fleet]\n"
        f'dsn = "{dsn}"\n'
        f'password_file = "{password_file}"\n'
        f'node = "{node}"\n'
        f'lease = "{LEASE:g}s"\n'
        f'sweep = "{int(SWEEP * 1000)}ms"\n'
        'connect_timeout = "2s"\n\n'
    )


class PgSession:
    """One connection of the test's own to the fleet's database, kept across steps (a lock
    held while the hosts act), on an event loop in a thread of its own."""

    def __init__(self, pg: PgServer, db: str) -> None:
        import asyncpg

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.conn: Any = self.run(
            asyncpg.connect(
                host=str(pg.sockdir), port=pg.port, user="postgres", database=db, timeout=10
            )
        )

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def execute(self, sql: str, *args: Any) -> str:
        result: str = self.run(self.conn.execute(sql, *args))
        return result

    def close(self) -> None:
        try:
            self.run(self.conn.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()


class FleetHosts:
    """The hosts of one test's fleet (``hosts[0]`` is node h1) and their shared database."""

    def __init__(self, pg: PgServer, db: str, hosts: list[DaemonProc], password_file: Path) -> None:
        self.pg = pg
        self.db = db
        self.hosts = hosts
        self.password_file = password_file  # what every host's [fleet] password_file names

    def __getitem__(self, i: int) -> DaemonProc:
        return self.hosts[i]

    def __iter__(self) -> Iterator[DaemonProc]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def node(self, host: DaemonProc) -> str:
        return f"h{self.hosts.index(host) + 1}"

    # -- the database ---------------------------------------------------------------------

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """``query`` as the superuser on the fleet's database."""
        return self.pg.sql(query, *args, db=self.db)

    def claims(self, job: str) -> list[dict[str, Any]]:
        """The job's rows of taskd.claims, oldest tick first; ``tick`` as epoch seconds."""
        rows = self.sql(
            "SELECT extract(epoch FROM tick)::float8, kind, fence, owner, state, takeovers,"
            " lost_owners, cause FROM taskd.claims WHERE job = $1 ORDER BY tick, kind",
            job,
        )
        keys = ("tick", "kind", "fence", "owner", "state", "takeovers", "lost_owners", "cause")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def wait_claims(
        self, job: str, pred: Callable[[list[dict[str, Any]]], bool], timeout: float
    ) -> list[dict[str, Any]]:
        """The job's claims once ``pred`` holds for them (before ``timeout``)."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = self.claims(job)
            return pred(found)

        poll(check, timeout=timeout, interval=0.1)
        return found

    def session(self) -> PgSession:
        return PgSession(self.pg, self.db)

    # -- the hosts --------------------------------------------------------------------------

    def cli(self, host: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
        """``taskd ARGS`` against ``host`` (its control socket, through its config)."""
        return run_cli(*args, "-c", str(host.config_path), timeout=30)

    def status(self, host: DaemonProc) -> dict[str, Any]:
        result = self.cli(host, "status", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def job_status(self, host: DaemonProc, job: str) -> dict[str, Any]:
        data = self.status(host)
        (row,) = [j for j in data["jobs"] if j["name"] == job]
        return dict(row)

    def stop(self) -> None:
        """Stop every host still running, cleanly: SIGTERM to taskd itself (a wrapper such as
        faketime passes no signal on, and exits when taskd has)."""
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                os.kill(host.daemon_pid, signal.SIGTERM)
        for host in self.hosts:
            if host.proc is not None:
                host.wait_exit(timeout=20)


def _db_name(test: str, n: int) -> str:
    return f"fleet_{re.sub(r'[^a-z0-9]+', '_', test.lower())[:40]}_{n}"


@pytest.fixture
def fleet_hosts(
    postgres: PgServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., FleetHosts]]:
    """``fleet_hosts(n, jobs_toml, env=None, wrap=None, start=True)`` -> :class:`FleetHosts`:
    ``n`` real ``taskd run`` hosts h1..hn on one config (``jobs_toml`` plus the harness's
    [daemon] and [fleet]) and a fresh database. ``env``: extra environment for every host;
    ``wrap``: {host number: a command it runs under}, e.g. ``{3: ["faketime", "-f", "+20s"]}``.
    Every host is killed after the test."""
    made: list[DaemonProc] = []
    count = 0
    password = tmp_path / "fleet.pw"
    password.write_text(FLEET_PASSWORD + "\n")
    password.chmod(0o600)

    def create(
        n: int,
        jobs_toml: str,
        env: dict[str, str] | None = None,
        wrap: dict[int, list[str]] | None = None,
        *,
        start: bool = True,
    ) -> FleetHosts:
        nonlocal count
        count += 1
        db = _db_name(request.node.name, count)
        dsn = postgres.fleet_db(db)
        hosts = []
        for i in range(1, n + 1):
            config = (
                daemon_table(process_workers="1") + fleet_table(f"h{i}", dsn, password) + jobs_toml
            )
            plugins = {"fleet_jobs.py": FLEET_PLUGIN}
            host = DaemonProc(tmp_path / f"fleet{count}" / f"h{i}", config, plugins, env)
            host.wrap = list((wrap or {}).get(i, []))
            made.append(host)
            hosts.append(host)
        fleet = FleetHosts(postgres, db, hosts, password)
        if start:
            for host in hosts:
                host.start(timeout=30)
        return fleet

    yield create
    for host in made:
        host.kill()
