"""Real database servers for the tests: PostgreSQL 15 and MariaDB, started once per session.

Each gets a data directory of its own under /tmp, listens on a free loopback port (and a
socket in its own folder), and runs as an unprivileged user (``nobody`` when the tests run as
root, as on CI; the current user otherwise). No system service is used or touched.

The fixtures never skip: CI installs both servers (``.ci/run``), so a server that cannot start
fails the tests that need it, with the reason and the server's log.

Both have a database ``shop`` with a table ``orders`` and a login ``report`` whose password is
:data:`REPORT_PASSWORD`, a string unusual enough to grep for in logs and the state database.
PostgreSQL also makes a fresh database per fleet test (:meth:`PgServer.fleet_db`), owned by
the login ``taskd_fleet`` (password :data:`FLEET_PASSWORD`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REPORT_USER = "report"
REPORT_PASSWORD = "pw-Zq8xK3vT-not-in-any-log"
ADMIN_PASSWORD = "admin-pw-Hh41"
FLEET_USER = "taskd_fleet"
FLEET_PASSWORD = "fleet-pw-Rw7nP2-not-in-any-log"
PG_BIN = Path(os.environ.get("TASKD_TEST_PG_BIN", "/usr/local/bin"))
START_TIMEOUT = 60.0

_SCHEMA = [
    "CREATE TABLE orders (id INT PRIMARY KEY, amount DECIMAL(10,2), note VARCHAR(200))",
    "INSERT INTO orders VALUES (1, 10.50, 'first'), (2, 20.00, 'second'), (3, 30.25, 'third')",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _die_with_parent() -> None:
    # A server outlives a killed pytest otherwise. Set after the user switch: a change of
    # credentials clears it.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _service_user() -> dict[str, Any]:
    """Popen keyword arguments that run a server as ``nobody`` when we are root."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)


def _run(argv: list[str], what: str, log: Path | None = None) -> None:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        **_service_user(),
    )
    if proc.returncode != 0:
        extra = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        pytest.fail(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{extra}",
            pytrace=False,
        )


def _in_thread(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a loop of its own in a thread: callable from sync and async tests."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro_fn()).result(timeout=60)


class _Server:
    """A server process we start and stop; the subclasses say how."""

    name = "server"
    port: int
    log: Path

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the server and wait until it accepts connections on its port."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                **_service_user(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if self.proc.poll() is not None else "did not answer"
                self.kill()
                pytest.fail(
                    f"{self.name} {why} (port {self.port}); its log:\n"
                    + self.log.read_text(errors="replace")[-4000:],
                    pytrace=False,
                )
            time.sleep(0.1)

    def ready(self) -> bool:
        return _listening(self.port)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM: its clean shutdown, which ends every session)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class PgServer(_Server):
    """PostgreSQL: superuser ``postgres`` (password :data:`ADMIN_PASSWORD`), scram over TCP."""

    name = "PostgreSQL"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.data = root / "data"
        self.sockdir = root / "sock"
        self.sockdir.mkdir()
        _own(self.sockdir)
        self.log = root / "postgres.log"
        self.port = _free_port()

    def init(self) -> None:
        for tool in ("initdb", "postgres"):
            if not (PG_BIN / tool).exists():
                pytest.fail(
                    f"PostgreSQL's {tool} is not in {PG_BIN} (set TASKD_TEST_PG_BIN)", pytrace=False
                )
        pwfile = self.root / "admin.pw"
        pwfile.write_text(ADMIN_PASSWORD + "\n")
        _own(pwfile)
        _run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            "initdb",
        )

    def argv(self) -> list[str]:
        return [
            str(PG_BIN / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.sockdir),
            # A throw-away server: durability buys nothing and costs seconds.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            # Fleet tests: three hosts, each with a pool and a LISTEN connection, plus the
            # sql_query tests' pools and the test's own sessions.
            "-c",
            "max_connections=100",
        ]

    def ready(self) -> bool:
        if not _listening(self.port):
            return False
        try:
            self.sql("SELECT 1", db="postgres")
        except Exception:
            return False
        return True

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
        """SIGINT is PostgreSQL's fast shutdown: sessions are ended, the server exits."""
        super().stop(sig, timeout)

    def dsn(self, user: str = REPORT_USER, db: str = "shop") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def sql(self, query: str, *args: Any, db: str = "shop") -> list[tuple[Any, ...]]:
        """Run ``query`` as the superuser and return its rows as tuples."""
        import asyncpg

        async def go() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(
                host=str(self.sockdir), port=self.port, user="postgres", database=db, timeout=10
            )
            try:
                return [tuple(r) for r in await conn.fetch(query, *args)]
            finally:
                await conn.close()

        return _in_thread(go)

    def connections(self, application_name: str) -> list[tuple[Any, ...]]:
        """(pid, state, query) of the sessions with this application_name."""
        return self.sql(
            "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        )

    def fleet_db(self, name: str) -> str:
        """A new, empty database ``name`` owned by ``taskd_fleet`` (the login made once per
        server): the DSN a fleet's hosts share, without the password (FLEET_PASSWORD goes in
        their password_file). taskd makes its tables itself, so each test starts bare."""
        if not self.sql("SELECT 1 FROM pg_roles WHERE rolname = $1", FLEET_USER, db="postgres"):
            self.sql(f"CREATE ROLE {FLEET_USER} LOGIN PASSWORD '{FLEET_PASSWORD}'", db="postgres")
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', db="postgres")
        self.sql(f'CREATE DATABASE "{name}" OWNER {FLEET_USER}', db="postgres")
        return self.dsn(FLEET_USER, name)

    def setup(self) -> None:
        self.sql("SELECT 1", db="postgres")
        self.sql(f"CREATE ROLE {REPORT_USER} LOGIN PASSWORD '{REPORT_PASSWORD}'", db="postgres")
        self.sql(f"CREATE DATABASE shop OWNER {REPORT_USER}", db="postgres")
        for stmt in _SCHEMA:
            self.sql(stmt)
        self.sql(f"GRANT ALL ON orders TO {REPORT_USER}")


class MariaServer(_Server):
    """MariaDB: ``root`` over the socket without a password, ``report`` over TCP."""

    name = "MariaDB"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.data = root / "data"
        self.socket = root / "mysqld.sock"
        self.log = root / "mariadb.log"
        self.port = _free_port()

    def init(self) -> None:
        self.mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        install = shutil.which("mariadb-install-db")
        if not os.path.exists(self.mariadbd) or install is None:
            pytest.fail(
                "MariaDB is not installed: apt-get install mariadb-server (.ci/run does)",
                pytrace=False,
            )
        _run(
            [
                install,
                "--no-defaults",
                f"--datadir={self.data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ],
            "mariadb-install-db",
        )

    def argv(self) -> list[str]:
        return [
            self.mariadbd,
            "--no-defaults",
            f"--datadir={self.data}",
            f"--socket={self.socket}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self.root / 'mariadbd.pid'}",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
            "--innodb-flush-log-at-trx-commit=0",
            "--performance-schema=OFF",
        ]

    def ready(self) -> bool:
        if not _listening(self.port):
            return False
        try:
            self.sql("SELECT 1", db=None)
        except Exception:
            return False
        return True

    def dsn(self, user: str = REPORT_USER, db: str = "shop") -> str:
        return f"mysql://{user}@127.0.0.1:{self.port}/{db}"

    def sql(self, query: str, *args: Any, db: str | None = "shop") -> list[tuple[Any, ...]]:
        """Run ``query`` as root over the socket and return its rows as tuples."""
        import pymysql

        conn = pymysql.connect(
            unix_socket=str(self.socket), user="root", database=db, connect_timeout=10
        )
        try:
            with conn.cursor() as cur:
                cur.execute(query, args or None)
                rows = [tuple(r) for r in cur.fetchall()]
            conn.commit()
            return rows
        finally:
            conn.close()

    def connections(self, user: str = REPORT_USER) -> list[tuple[Any, ...]]:
        """(id, command, info) of the sessions of ``user``."""
        return self.sql(
            "SELECT id, command, info FROM information_schema.processlist WHERE user = %s", user
        )

    def setup(self) -> None:
        self.sql("CREATE DATABASE shop", db=None)
        for stmt in _SCHEMA:
            self.sql(stmt)
        for host in ("127.0.0.1", "localhost"):
            self.sql(f"CREATE USER '{REPORT_USER}'@'{host}' IDENTIFIED BY '{REPORT_PASSWORD}'")
            self.sql(f"GRANT ALL ON shop.* TO '{REPORT_USER}'@'{host}'")


def _serve(server_cls: type[PgServer] | type[MariaServer]) -> Iterator[Any]:
    root = Path(tempfile.mkdtemp(prefix=f"taskd-{server_cls.name.lower()}-"))
    # mkdtemp makes it 0700: the server's user must get in.
    root.chmod(0o755)
    _own(root)
    server = server_cls(root)
    try:
        server.init()
        server.start()
        server.setup()
        yield server
    finally:
        # A clean stop first: the server reaps its own children (PID 1 may not, here).
        server.stop(timeout=15)
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """A PostgreSQL 15 server for the whole session (see the module docstring)."""
    yield from _serve(PgServer)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaServer]:
    """A MariaDB server for the whole session (see the module docstring)."""
    yield from _serve(MariaServer)


@pytest.fixture
def postgres(postgres_server: PgServer) -> Iterator[PgServer]:
    """The session's PostgreSQL, running (a test that stopped it gets it back afterwards)."""
    if postgres_server.proc is None or postgres_server.proc.poll() is not None:
        postgres_server.start()
    yield postgres_server
    if postgres_server.proc is None or postgres_server.proc.poll() is not None:
        postgres_server.start()


@pytest.fixture
def mariadb(mariadb_server: MariaServer) -> Iterator[MariaServer]:
    """The session's MariaDB, running (a test that stopped it gets it back afterwards)."""
    if mariadb_server.proc is None or mariadb_server.proc.poll() is not None:
        mariadb_server.start()
    yield mariadb_server
    if mariadb_server.proc is None or mariadb_server.proc.poll() is not None:
        mariadb_server.start()
