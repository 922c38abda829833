"""plugins/sql_query.py against a real PostgreSQL 15 and a real MariaDB (tests/dbservers.py).

The job is called the way the daemon calls it: a JobContext per run, sharing one Resources
registry, so the pool is kept across runs exactly as in the daemon."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import sys
import time
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from taskd.run.context import JobContext
from taskd.run.resources import Resources
from taskd.state.shared import SharedState
from tests.dbservers import REPORT_PASSWORD, MariaServer, PgServer
from tests.plugins_bundled.conftest import LoadPlugin

pytestmark = pytest.mark.timeout(60)

Server = PgServer | MariaServer
_ids = itertools.count(1)


@pytest.fixture
def mod(load_plugin: LoadPlugin) -> types.ModuleType:
    return load_plugin("sql_query")


@pytest.fixture(params=["postgres", "mariadb"])
def server(request: pytest.FixtureRequest) -> Server:
    """Each test that takes ``server`` runs against both."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    path = tmp_path / "report.pw"
    path.write_text(REPORT_PASSWORD + "\n")
    path.chmod(0o600)
    return path


class Runner:
    """Runs the job like the daemon: one context per run, one resource registry per job."""

    def __init__(self, mod: types.ModuleType, server: Server, pwfile: Path) -> None:
        self.mod = mod
        self.server = server
        self.job = f"sqltest{next(_ids)}"
        self.resources = Resources(structlog.get_logger("test"))
        self.defaults: dict[str, Any] = {"dsn": server.dsn(), "password_file": str(pwfile)}

    def placeholders(self, n: int) -> list[str]:
        return [f"${i}" if isinstance(self.server, PgServer) else "%s" for i in range(1, n + 1)]

    async def __call__(self, query: str, **options: Any) -> dict[str, Any]:
        ctx = JobContext(
            job=self.job,
            run_id=f"r{next(_ids)}",
            attempt=1,
            scheduled=time.time(),
            state=SharedState(),
            resources=self.resources,
        )
        try:
            result: dict[str, Any] = await self.mod.sql_query(
                ctx, query=query, **{**self.defaults, **options}
            )
            return result
        finally:
            ctx.release_resources()

    def pool(self) -> Any:
        """The job's pool holder (the value behind ctx.resource("pool"))."""
        scope = self.resources._current[self.job]
        return scope._values["pool"]

    def sessions(self) -> list[tuple[Any, ...]]:
        if isinstance(self.server, PgServer):
            return self.server.connections(f"taskd/{self.job}")
        return self.server.connections()


@pytest.fixture
async def runner(mod: types.ModuleType, server: Server, pwfile: Path) -> AsyncIterator[Runner]:
    r = Runner(mod, server, pwfile)
    yield r
    await r.resources.close_all()


def wait_until(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"not within {timeout}s: {value!r}"
        time.sleep(0.05)
    return value


class TestContract:
    """Registered as an io job with TOML-typed options."""

    def test_registered(self, mod: types.ModuleType, job_types, options_contract) -> None:
        [jt] = job_types(mod)
        assert (jt.name, jt.kind) == ("sql_query", "io")
        options_contract(jt)

    async def test_loads_and_fails_clearly_without_the_drivers(
        self, load_plugin: LoadPlugin, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in ("asyncpg", "aiomysql"):
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
        mod = load_plugin("sql_query")
        ctx = JobContext(job="j", run_id="r", attempt=1, scheduled=0.0, state=SharedState())
        for dsn, package in (("postgresql://u@h/db", "asyncpg"), ("mysql://u@h/db", "aiomysql")):
            with pytest.raises(mod.SqlQueryError) as err:
                await mod.sql_query(ctx, dsn=dsn, query="SELECT 1")
            assert f"pip install {package}" in str(err.value)
            assert "taskd[sql]" in str(err.value)

    async def test_bad_dsn(self, mod: types.ModuleType) -> None:
        ctx = JobContext(job="j", run_id="r", attempt=1, scheduled=0.0, state=SharedState())
        with pytest.raises(ValueError, match=r"postgresql://, postgres:// or mysql://"):
            await mod.sql_query(ctx, dsn="sqlite:///x.db", query="SELECT 1")
        with pytest.raises(ValueError, match="has a password in it") as err:
            await mod.sql_query(ctx, dsn="postgresql://u:hunter2@h/db", query="SELECT 1")
        assert "hunter2" not in str(err.value)
        assert "postgresql://u:***@h/db" in str(err.value)
        with pytest.raises(ValueError, match="has a password in it") as err:
            await mod.sql_query(ctx, dsn="postgresql://u@h/db?password=hunter2", query="SELECT 1")
        assert "hunter2" not in str(err.value)

    async def test_a_password_with_url_delimiters_is_refused_unshown(
        self, mod: types.ModuleType
    ) -> None:
        # "/", "#" or "?" in a password cut the authority short: urlsplit reads "u:Sx9" as
        # host:port. The refusal must not quote any of it.
        ctx = JobContext(job="j", run_id="r", attempt=1, scheduled=0.0, state=SharedState())
        for scheme in ("postgresql", "mysql"):
            for pw in ("Sx9/qrest", "Sx9#qrest", "Sx9?qrest", "123/qrest"):
                dsn = f"{scheme}://report:{pw}@127.0.0.1:5432/shop"
                with pytest.raises(ValueError, match="password") as err:
                    await mod.sql_query(ctx, dsn=dsn, query="SELECT 1")
                text = str(err.value)
                assert "password" in text and "%40" in text, text
                assert pw.split("/")[0].split("#")[0].split("?")[0] not in text, text
                assert "qrest" not in text, text
        with pytest.raises(ValueError, match="port") as err:
            await mod.sql_query(ctx, dsn="postgresql://db.example:54x2/shop", query="SELECT 1")
        assert "'db.example'" in str(err.value)

    async def test_an_encoded_password_parameter_is_refused(
        self, mod: types.ModuleType, server: Server
    ) -> None:
        # The driver decodes the key: ?pass%77ord= is ?password= to it and would connect.
        ctx = JobContext(job="j", run_id="r", attempt=1, scheduled=0.0, state=SharedState())
        for key in ("pass%77ord", "PASSWORD", "pass%57ord"):
            dsn = f"{server.dsn()}?{key}={REPORT_PASSWORD}"
            with pytest.raises(ValueError, match="has a password in it") as err:
                await mod.sql_query(ctx, dsn=dsn, query="SELECT 1")
            assert REPORT_PASSWORD not in str(err.value)


class TestQuery:
    """Rows, bound parameters, limits, statements without rows."""

    async def test_rows_and_types(self, runner: Runner) -> None:
        a, b = runner.placeholders(2)
        result = await runner(
            f"SELECT id, amount, note FROM orders WHERE id >= {a} AND note <> {b} ORDER BY id",
            params=[2, "nope"],
        )
        assert result["columns"] == ["id", "amount", "note"]
        assert result["rows"] == [
            {"id": 2, "amount": 20, "note": "second"},
            {"id": 3, "amount": 30.25, "note": "third"},
        ]
        assert (result["row_count"], result["more_rows"], result["truncated"]) == (2, False, None)

    async def test_parameters_are_bound_not_formatted(self, runner: Runner) -> None:
        [p] = runner.placeholders(1)
        evil = "x' OR '1'='1"
        assert (await runner(f"SELECT id FROM orders WHERE note = {p}", params=[evil]))[
            "rows"
        ] == []
        # A value with quotes and a percent sign arrives intact.
        tricky = 'it\'s 100% "quoted"; DROP TABLE orders; --'
        result = await runner(f"SELECT {p} AS v", params=[tricky])
        assert result["rows"] == [{"v": tricky}]
        assert (await runner("SELECT count(*) AS n FROM orders"))["rows"] == [{"n": 3}]

    async def test_toml_scalars_as_parameters(self, runner: Runner) -> None:
        a, b, c = runner.placeholders(3)
        # PostgreSQL types each parameter from the query: a bare $n in a SELECT list is text.
        pg = isinstance(runner.server, PgServer)
        d, f, t = ("::date", "::float8", "::bool") if pg else ("", "", "")
        result = await runner(
            f"SELECT {a}{d} AS d, {b}{f} AS f, {c}{t} AS t",
            params=[dt.date(2024, 2, 29), 1.5, True],
        )
        [row] = result["rows"]
        assert row["d"] == "2024-02-29" and row["f"] == 1.5 and row["t"] in (True, 1)

    async def test_row_limit_and_max_bytes(self, runner: Runner) -> None:
        big = "SELECT n FROM (SELECT 1 AS n UNION ALL SELECT 2 UNION ALL SELECT 3) t ORDER BY n"
        result = await runner(big, row_limit=2)
        assert result["rows"] == [{"n": 1}, {"n": 2}]
        assert (result["row_count"], result["more_rows"], result["truncated"]) == (
            2,
            True,
            "row_limit",
        )
        result = await runner("SELECT note FROM orders ORDER BY id", max_bytes=40)
        assert result["truncated"] == "max_bytes"
        assert result["row_count"] == 3 and not result["more_rows"]
        assert 0 < len(result["rows"]) < 3

    async def test_the_result_stays_small_on_a_huge_query(self, runner: Runner) -> None:
        # 200,000 rows: only row_limit + 1 are read; the pool stays usable afterwards.
        if isinstance(runner.server, PgServer):
            huge = "SELECT g AS n FROM generate_series(1, 200000) g"
        else:
            huge = "SELECT seq AS n FROM seq_1_to_200000"
        result = await runner(huge, row_limit=5)
        assert len(result["rows"]) == 5 and result["more_rows"]
        assert (await runner("SELECT 1 AS one"))["rows"] == [{"one": 1}]

    async def test_statement_without_rows(self, runner: Runner) -> None:
        [p] = runner.placeholders(1)
        result = await runner(f"UPDATE orders SET amount = amount + 1 WHERE id <= {p}", params=[2])
        assert result["rows"] == [] and result["columns"] == []
        assert "2" in result["status"]
        await runner(f"UPDATE orders SET amount = amount - 1 WHERE id <= {p}", params=[2])


class TestExpectations:
    """min_rows/max_rows and min_value/max_value fail the run when they do not hold."""

    async def test_row_counts(self, runner: Runner, mod: types.ModuleType) -> None:
        q = "SELECT id FROM orders"
        assert (await runner(q, min_rows=3, max_rows=3))["row_count"] == 3
        with pytest.raises(mod.ExpectationFailed, match=r"3 row\(s\) < min_rows 4"):
            await runner(q, min_rows=4)
        # max_rows is decided even past row_limit: enough rows are read to know.
        with pytest.raises(mod.ExpectationFailed, match=r": 3 row\(s\) > max_rows 2"):
            await runner(q, max_rows=2, row_limit=1)
        # Past what is read (max_rows + 1), the count is a lower bound.
        with pytest.raises(mod.ExpectationFailed, match=r": 3\+ row\(s\) > max_rows 2"):
            await runner("SELECT a.id FROM orders a, orders b", max_rows=2, row_limit=1)

    async def test_value_against_thresholds(self, runner: Runner, mod: types.ModuleType) -> None:
        q = "SELECT count(*) AS n, sum(amount) AS total FROM orders"
        result = await runner(q, value_column="total", max_value=100.0)
        assert result["value"] == 60.75
        with pytest.raises(mod.ExpectationFailed, match=r"column 'total' = 60.75 > max_value 50"):
            await runner(q, value_column="total", max_value=50.0)
        with pytest.raises(mod.ExpectationFailed, match=r"column 'n' = 3 < min_value 5"):
            await runner(q, min_value=5.0)
        with pytest.raises(mod.ExpectationFailed, match="no row to check"):
            await runner("SELECT id FROM orders WHERE id < 0", max_value=1.0)
        with pytest.raises(mod.ExpectationFailed, match=r"'first', not a number"):
            await runner("SELECT note FROM orders WHERE id = 1", max_value=1.0)
        with pytest.raises(mod.SqlQueryError, match="'nope' is not a column"):
            await runner(q, value_column="nope")


class TestPassword:
    """From a file or the environment; never in an error."""

    async def test_from_env(self, runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TASKD_TEST_DB_PW", REPORT_PASSWORD)
        result = await runner(
            "SELECT 1 AS one", password_file=None, password_env="TASKD_TEST_DB_PW"
        )
        assert result["rows"] == [{"one": 1}]

    async def test_only_the_files_first_line_is_the_password(
        self, runner: Runner, tmp_path
    ) -> None:
        # As documented: a file may carry a note after the password (who rotated it, when).
        noted = tmp_path / "noted.pw"
        noted.write_text(f"{REPORT_PASSWORD}\r\n# rotated by ops, see ticket 42\n")
        noted.chmod(0o600)
        result = await runner("SELECT 1 AS one", password_file=str(noted))
        assert result["rows"] == [{"one": 1}]

    async def test_missing_sources(self, runner: Runner, mod: types.ModuleType, tmp_path) -> None:
        with pytest.raises(mod.SqlQueryError, match="'TASKD_NOPE' is not set"):
            await runner("SELECT 1", password_file=None, password_env="TASKD_NOPE")
        with pytest.raises(mod.SqlQueryError, match="No such file"):
            await runner("SELECT 1", password_file=str(tmp_path / "missing.pw"))
        with pytest.raises(ValueError, match="at most one"):
            await runner("SELECT 1", password_env="X")

    async def test_wrong_password(self, runner: Runner, mod: types.ModuleType, tmp_path) -> None:
        wrong = tmp_path / "wrong.pw"
        wrong.write_text("Wrong-Secret-93kd\n")
        with pytest.raises(mod.SqlQueryError) as err:
            await runner("SELECT 1", password_file=str(wrong))
        text = str(err.value)
        assert "Wrong-Secret-93kd" not in text and REPORT_PASSWORD not in text
        assert "report" in text  # names the user
        assert "password authentication failed" in text or "Access denied" in text
        # Fixed in the file: the next run opens a new pool, re-reading it (a pool kept with
        # the old password would fail for ever).
        wrong.write_text(REPORT_PASSWORD)
        assert (await runner("SELECT 1 AS one", password_file=str(wrong)))["rows"] == [{"one": 1}]
        assert runner.pool().opened == 2


def _sleep_sql(server: Server, seconds: int) -> str:
    return (
        f"SELECT pg_sleep({seconds})"
        if isinstance(server, PgServer)
        else f"SELECT SLEEP({seconds})"
    )


def _sleeping(server: Server) -> list[tuple[Any, ...]]:
    """Statements still sleeping on the server, from any session."""
    if isinstance(server, PgServer):
        return server.sql(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep(%' "
            "AND pid <> pg_backend_pid()"
        )
    return [r for r in server.connections() if r[2] and "SLEEP(" in r[2]]


class TestTimeouts:
    """The statement timeout cancels the statement on the server, as does a cancelled run."""

    async def test_statement_timeout(self, runner: Runner, mod: types.ModuleType) -> None:
        start = time.monotonic()
        with pytest.raises(mod.SqlQueryError) as err:
            await runner(_sleep_sql(runner.server, 30), statement_timeout=1.0)
        assert time.monotonic() - start < 10
        text = str(err.value)
        assert "statement timeout" in text or "max_statement_time" in text, text
        assert not runner.pool().broken  # a statement error, the pool is fine
        assert not _sleeping(runner.server)
        assert (await runner("SELECT 1 AS one"))["rows"] == [{"one": 1}]

    async def test_a_cancelled_run_cancels_the_statement(self, runner: Runner) -> None:
        # The job's own timeout (or the daemon stopping) cancels the run mid-statement.
        task = asyncio.ensure_future(runner(_sleep_sql(runner.server, 30)))
        await asyncio.to_thread(wait_until, lambda: _sleeping(runner.server))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Soon: well before MariaDB would notice the closed socket by itself (it checks
        # every 5 s in a SLEEP, never in a long scan) or the sleep would end.
        assert await asyncio.to_thread(wait_until, lambda: not _sleeping(runner.server), 2.5)
        assert (await runner("SELECT 1 AS one"))["rows"] == [{"one": 1}]
        # No connection left behind beyond the pool's.
        assert len(await asyncio.to_thread(runner.sessions)) <= 2


class TestServerRestarts:
    """A server that goes away and comes back: no dead pool is kept."""

    async def test_goes_away_mid_run_and_comes_back(
        self, runner: Runner, mod: types.ModuleType
    ) -> None:
        assert (await runner("SELECT 1 AS one"))["rows"] == [{"one": 1}]
        task = asyncio.ensure_future(runner(_sleep_sql(runner.server, 30)))
        await asyncio.to_thread(wait_until, lambda: _sleeping(runner.server))
        await asyncio.to_thread(runner.server.stop)
        with pytest.raises(mod.SqlQueryError) as err:
            await task
        assert "the pool is replaced at the next run" in str(err.value), err.value
        # Still down: the next run fails too, with a connection error, and quickly.
        with pytest.raises(mod.SqlQueryError, match="pool is replaced"):
            await runner("SELECT 1 AS one", connect_timeout=3.0)
        await asyncio.to_thread(runner.server.start)
        assert (await runner("SELECT 1 AS one"))["rows"] == [{"one": 1}]
        assert runner.pool().opened >= 2
        assert len(await asyncio.to_thread(runner.sessions)) == 1

    async def test_restart_between_runs(self, runner: Runner) -> None:
        assert (await runner("SELECT 1 AS one"))["rows"] == [{"one": 1}]
        await asyncio.to_thread(runner.server.stop)
        await asyncio.to_thread(runner.server.start)
        # The pool's idle connection died with the old server; the driver notices and
        # connects again, so the run after the restart succeeds.
        assert (await runner("SELECT 1 AS one"))["rows"] == [{"one": 1}]

    async def test_one_connection_across_runs_none_after_close(self, runner: Runner) -> None:
        for _ in range(5):
            await runner("SELECT 1 AS one")
        assert len(await asyncio.to_thread(runner.sessions)) == 1
        await runner.resources.close_all()
        assert await asyncio.to_thread(wait_until, lambda: not runner.sessions(), 5)
