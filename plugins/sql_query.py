"""Bundled taskd plugin: ``sql_query``, a query against PostgreSQL (asyncpg) or MySQL/MariaDB
(aiomysql) through a connection pool the job keeps across runs.

A drop-in file: the daemon loads it by path. The job is ``kind="io"``: both drivers are
asyncio-native, so a query in flight costs the event loop nothing.

The drivers are an extra (``pip install 'taskd[sql]'``): this file loads without them and only
its runs fail, saying what to install. The driver comes from the DSN's scheme.

- The pool is ``ctx.resource("pool", ...)``: opened by the first run, shared by later ones,
  closed when a reload changes or removes the job and when the daemon stops. A run that fails
  on the connection (server gone, auth refused, no answer) marks it broken: the next run closes
  it and opens a new one (re-reading the password), so a dead pool is never kept.
- Parameters are passed to the driver, never formatted into the SQL: PostgreSQL binds them
  server-side (``$1``); aiomysql escapes them into the statement (``%s``).
- The statement timeout is set on the server (PostgreSQL ``statement_timeout``, MariaDB
  ``max_statement_time``, MySQL ``max_execution_time``) and bounded on the client too. A run
  cancelled mid-query (its timeout, the daemon stopping) cancels the query on the server:
  asyncpg sends a CancelRequest; for MySQL a ``KILL QUERY`` is sent on a connection of its own.
- The password comes from ``password_file`` or ``password_env``, never from the DSN, and is
  scrubbed from any error text.
"""

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import taskd
from taskd.config.secrets import (
    PasswordUnavailable,
    SecretKeys,
    dsn_without_password,
    one_source,
    read_password,
)

# What TOML can give as a query parameter.
Param = str | int | float | bool | dt.datetime | dt.date | dt.time

_SCHEMES = {"postgresql": "pg", "postgres": "pg", "mysql": "mysql", "mariadb": "mysql"}
_INSTALL = {"pg": ("asyncpg", "PostgreSQL"), "mysql": ("aiomysql", "MySQL/MariaDB")}
# The client-side bound is the server's timeout plus this: the server's own error, which names
# the timeout, should win whenever the server still answers.
_CLIENT_MARGIN = 2.0
_CLOSE_TIMEOUT = 5.0  # for a pool being replaced, and for a KILL QUERY
# MySQL errors that say the connection, not the statement, failed: access denied (1044,
# 1045), too many connections (1040), server shutdown (1053), connection killed (1927), and
# every client-side error (2000 and up: can't connect, gone away, lost connection).
_MYSQL_CONN_CODES = {1040, 1044, 1045, 1053, 1152, 1927}


# The password rule every DSN of taskd follows (taskd.config.secrets), named as options.
_KEYS = SecretKeys(
    dsn="option 'dsn'",
    file="option 'password_file'",
    env="option 'password_env'",
    prefix="sql_query: ",
)


class SqlQueryError(RuntimeError):
    """The query could not be run; the message says where and why (never the password)."""


class ExpectationFailed(RuntimeError):
    """The query ran, but a row count or value expectation did not hold."""


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


class _Target:
    """The parsed DSN: which driver, where, as whom; ``label`` is safe to show."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        driver = _SCHEMES.get(parts.scheme.lower())
        if driver is None:
            raise ValueError(
                f"sql_query: option 'dsn' must start with postgresql://, postgres:// or "
                f"mysql:// (mariadb:// too), got {parts.scheme + '://' if parts.scheme else dsn!r}"
            )
        dsn_without_password(dsn, _KEYS)
        try:
            port = parts.port
        except ValueError:
            # urlsplit's message quotes the text after the ':', which is no place to look.
            raise ValueError(
                f"sql_query: option 'dsn': the port after host {parts.hostname!r} is not a "
                f"number from 0 to 65535"
            ) from None
        self.dsn = dsn
        self.driver = driver
        self.host = parts.hostname or "localhost"
        self.port = port or (5432 if driver == "pg" else 3306)
        self.user = unquote(parts.username or "")
        self.database = unquote(parts.path.lstrip("/"))
        self.query = parts.query
        who = f"{self.user}@" if self.user else ""
        self.label = f"{parts.scheme}://{who}{self.host}:{self.port}/{self.database}"


def _seconds(value: dt.timedelta | float) -> float:
    # The daemon passes a timedelta (from "30s" or 30); a direct call may pass a number.
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


def _jsonable(value: Any) -> Any:
    """A driver's value as JSON can hold it (history keeps results as JSON)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class _Pool:
    """The job's driver pool: opened on demand, replaced after a connection-level failure."""

    def __init__(self, closer: Callable[[Any], Awaitable[None]]) -> None:
        self._closer = closer
        self._lock = asyncio.Lock()
        self.pool: Any = None
        self.secret: str | None = None
        self.broken = False
        self.opened = 0  # pools opened so far: a test can see a replacement

    async def get(self, opener: Callable[[], Awaitable[tuple[str | None, Any]]]) -> Any:
        """The pool, opened by ``opener`` (the asking run's: it returns the password it used,
        kept to scrub it from error texts, and the pool) if there is none or it is broken."""
        async with self._lock:
            if self.pool is not None and self.broken:
                old, self.pool = self.pool, None
                await self._closer(old)
            if self.pool is None:
                self.secret, self.pool = await opener()
                self.broken = False
                self.opened += 1
            return self.pool

    async def aclose(self) -> None:
        old, self.pool = self.pool, None
        if old is not None:
            await self._closer(old)


async def _read_password(ctx: taskd.JobContext, file: str | None, env: str | None) -> str | None:
    one_source(file, env, _KEYS)  # a ValueError before any thread is asked
    try:
        if file is None:
            return read_password(None, env, _KEYS)  # the environment: no I/O
        # In a thread: a stat can hang on a dead network mount.
        return await ctx.to_thread(read_password, file, None, _KEYS)
    except PasswordUnavailable as exc:
        raise SqlQueryError(str(exc)) from None


def _import(driver: str) -> Any:
    module, what = _INSTALL[driver]
    try:
        return __import__(module)
    except ImportError:
        raise SqlQueryError(
            f"sql_query: {what} needs the {module} package, which is not installed: "
            f"pip install 'taskd[sql]' (or pip install {module}) in the daemon's environment"
        ) from None


# -- PostgreSQL (asyncpg) -------------------------------------------------------------------


def _pg_is_connection_error(exc: BaseException) -> bool:
    import asyncpg

    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.InvalidAuthorizationSpecificationError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | asyncpg.TooManyConnectionsError,
    )


async def _pg_open(t: _Target, password: str | None, job: str, cfg: dict[str, Any]) -> Any:
    asyncpg = _import("pg")
    return await asyncpg.create_pool(
        t.dsn,
        password=password,
        min_size=0,
        max_size=cfg["pool_size"],
        timeout=cfg["connect_timeout"],
        server_settings={
            "statement_timeout": str(int(cfg["statement_timeout"] * 1000)),
            "application_name": f"taskd/{job}"[:63],
        },
    )


async def _pg_close(pool: Any) -> None:
    try:
        await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT)
    except TimeoutError:
        pool.terminate()  # a run still holds a connection: it is broken anyway


async def _acquire(pool: Any, seconds: float) -> Any:
    try:
        async with asyncio.timeout(seconds):
            return await pool.acquire()
    except TimeoutError:
        raise TimeoutError(f"no connection within {seconds:g}s (connect_timeout)") from None


@contextlib.asynccontextmanager
async def _answer_within(seconds: float) -> AsyncIterator[None]:
    """The client-side bound on a statement, past the server's own timeout."""
    try:
        async with asyncio.timeout(seconds + _CLIENT_MARGIN):
            yield
    except TimeoutError:
        raise TimeoutError(
            f"no answer within {seconds + _CLIENT_MARGIN:g}s (statement_timeout {seconds:g}s "
            f"+ {_CLIENT_MARGIN:g}s): the server or the network is stuck"
        ) from None


async def _pg_run(pool: Any, cfg: dict[str, Any], read: int) -> dict[str, Any]:
    conn = await _acquire(pool, cfg["connect_timeout"])
    try:
        async with _answer_within(cfg["statement_timeout"]):
            stmt = await conn.prepare(cfg["query"])
            columns = [a.name for a in stmt.get_attributes()]
            if not columns:  # no result set (UPDATE, DDL...): run it, report its status
                await stmt.fetch(*cfg["params"])
                return {"columns": [], "rows": [], "status": stmt.get_statusmsg()}
            # A cursor in a transaction streams the rows: no more than `read` are fetched,
            # whatever the query returns.
            async with conn.transaction():
                cursor = await stmt.cursor(*cfg["params"])
                rows = await cursor.fetch(read)
            return {"columns": columns, "rows": [tuple(r) for r in rows]}
    finally:
        # On a cancel asyncpg has already sent the server a CancelRequest; release resets
        # the connection or, failing that, terminates it.
        await pool.release(conn, timeout=_CLOSE_TIMEOUT)


# -- MySQL / MariaDB (aiomysql) -------------------------------------------------------------


def _mysql_is_connection_error(exc: BaseException) -> bool:
    import pymysql

    if isinstance(exc, OSError | TimeoutError | pymysql.err.InterfaceError):
        return True
    if isinstance(exc, pymysql.err.OperationalError) and exc.args:
        code = exc.args[0]
        return isinstance(code, int) and (code >= 2000 or code in _MYSQL_CONN_CODES)
    return False


def _mysql_kwargs(t: _Target, password: str | None, cfg: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "host": t.host,
        "port": t.port,
        "user": t.user or None,
        "db": t.database or None,
        "autocommit": True,  # else each run's SELECT would read the first run's snapshot
        "connect_timeout": cfg["connect_timeout"],
    }
    if password is not None:
        kwargs["password"] = password
    for raw, value in (p.split("=", 1) for p in t.query.split("&") if p):
        key = unquote(raw)
        if key not in ("unix_socket", "charset"):
            raise ValueError(
                f"sql_query: option 'dsn': unknown parameter {key!r} for mysql:// "
                f"(known: unix_socket, charset)"
            )
        kwargs[key] = unquote(value)
    return kwargs


async def _mysql_open(t: _Target, password: str | None, cfg: dict[str, Any]) -> Any:
    aiomysql = _import("mysql")
    kwargs = _mysql_kwargs(t, password, cfg)
    pool = await aiomysql.create_pool(minsize=0, maxsize=cfg["pool_size"], **kwargs)
    pool.taskd_connect = kwargs  # for a KILL QUERY on a connection of its own
    pool.taskd_released = asyncio.Event()  # set by each release, for _mysql_close
    return pool


async def _mysql_close(pool: Any) -> None:
    pool.close()
    # Wait for the connections in use on our own event, not in wait_closed(): aiomysql's
    # release of a connection a cancelled run already closed wakes no one waiting there, so
    # it would sit out the whole timeout (a stop took 5 s more than shutdown_timeout).
    released: asyncio.Event = pool.taskd_released
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            while pool.size > pool.freesize:
                released.clear()
                await released.wait()
    except TimeoutError:
        pool.terminate()  # a run still holds a connection: it is broken anyway
    await pool.wait_closed()  # nothing in use now: closes the idle ones and returns


async def _mysql_kill(pool: Any, thread_id: int) -> None:
    """Stop a statement on the server: closing our socket does not (a SLEEP or a long scan
    runs on until it next writes)."""
    import aiomysql

    conn = await aiomysql.connect(**pool.taskd_connect)
    try:
        async with conn.cursor() as cur:
            await cur.execute("KILL QUERY %s", (thread_id,))
    finally:
        conn.close()


async def _mysql_timeout(conn: Any, seconds: float) -> None:
    """Set the session's statement timeout, once per connection."""
    if getattr(conn, "taskd_timeout", None) == seconds:
        return
    if "mariadb" in conn.get_server_info().lower():
        sql, value = "SET SESSION max_statement_time = %s", seconds
    else:  # MySQL's (SELECT only), in milliseconds
        sql, value = "SET SESSION max_execution_time = %s", int(seconds * 1000)
    async with conn.cursor() as cur:
        await cur.execute(sql, (value,))
    conn.taskd_timeout = seconds


async def _mysql_run(pool: Any, cfg: dict[str, Any], read: int) -> dict[str, Any]:
    import aiomysql

    conn = await _acquire(pool, cfg["connect_timeout"])
    try:
        async with _answer_within(cfg["statement_timeout"]):
            await _mysql_timeout(conn, cfg["statement_timeout"])
            # Unbuffered: rows come as they are read, so no more than `read` are held.
            cur = await conn.cursor(aiomysql.SSCursor)
            await cur.execute(cfg["query"], cfg["params"] or None)
            if cur.description is None:
                return {"columns": [], "rows": [], "status": f"{cur.rowcount} row(s) affected"}
            rows = await cur.fetchmany(read)
            if len(rows) == read:
                # Reading the rest of an unbuffered result to free the connection could take
                # as long as the whole query: drop the connection instead.
                conn.close()
            else:
                await cur.close()
            return {"columns": [d[0] for d in cur.description], "rows": rows}
    except (asyncio.CancelledError, TimeoutError):
        # Cancelled (the job's timeout, the daemon stopping) or no answer in time: aiomysql
        # has closed or will drop the connection, but the server runs the statement on (a
        # long scan until it next writes). Kill it on a connection of its own; shielded so a
        # second cancel cannot skip it, and bounded.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            kill = asyncio.ensure_future(_mysql_kill(pool, conn.thread_id()))
            await asyncio.wait_for(asyncio.shield(kill), _CLOSE_TIMEOUT)
        conn.close()
        raise
    except BaseException as exc:
        import pymysql

        # An error the server reported for the statement leaves the connection usable; any
        # other leaves it in an unknown state: never back into the pool.
        if _mysql_is_connection_error(exc) or not isinstance(exc, pymysql.err.MySQLError):
            conn.close()
        raise
    finally:
        await pool.release(conn)
        pool.taskd_released.set()


# -- the job ------------------------------------------------------------------------------


def _check(result: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    failed: list[str] = []
    count, more = result["row_count"], result["more_rows"]
    if cfg["min_rows"] is not None and count < cfg["min_rows"] and not more:
        failed.append(f"{count} row(s) < min_rows {cfg['min_rows']}")
    if cfg["max_rows"] is not None and (more or count > cfg["max_rows"]):
        failed.append(f"{count}{'+' if more else ''} row(s) > max_rows {cfg['max_rows']}")
    lo, hi = cfg["min_value"], cfg["max_value"]
    if lo is None and hi is None:
        return failed
    value, where = result.get("value"), result.get("value_from", "the first column")
    if not result["row_count"]:
        failed.append(f"no row to check {where} against min_value/max_value")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        failed.append(f"{where} of the first row is {value!r}, not a number")
    elif lo is not None and value < lo:
        failed.append(f"{where} = {value:g} < min_value {lo:g}")
    elif hi is not None and value > hi:
        failed.append(f"{where} = {value:g} > max_value {hi:g}")
    return failed


def _shape(raw: dict[str, Any], cfg: dict[str, Any], read: int) -> dict[str, Any]:
    """The result: rows as column->value tables within row_limit and max_bytes."""
    columns, rows = raw["columns"], raw["rows"]
    more = len(rows) == read
    if more:
        rows = rows[: read - 1]
    kept: list[dict[str, Any]] = []
    size, truncated = 2, None
    for row in rows:
        if len(kept) >= cfg["row_limit"]:
            truncated = "row_limit"
            break
        item = {c: _jsonable(v) for c, v in zip(columns, row, strict=False)}
        size += len(json.dumps(item, ensure_ascii=False)) + 2
        if size > cfg["max_bytes"]:
            truncated = "max_bytes"
            break
        kept.append(item)
    if more and truncated is None:
        truncated = "row_limit"
    result: dict[str, Any] = {"columns": columns, "rows": kept, "row_count": len(rows)}
    result["more_rows"] = more
    result["truncated"] = truncated
    if "status" in raw:
        result["status"] = raw["status"]
    column = cfg["value_column"]
    if column is not None or cfg["min_value"] is not None or cfg["max_value"] is not None:
        if column is not None and column not in columns:
            raise SqlQueryError(
                f"sql_query: option 'value_column' {column!r} is not a column of the result "
                f"(its columns: {', '.join(columns) or 'none'})"
            )
        index = columns.index(column) if column is not None else 0
        result["value_from"] = f"column {columns[index]!r}" if columns else "the first column"
        result["value"] = _jsonable(rows[0][index]) if rows and columns else None
    return result


async def sql_query(
    ctx: taskd.JobContext,
    dsn: str,
    query: str,
    params: list[Param] | None = None,
    password_file: str | None = None,
    password_env: str | None = None,
    statement_timeout: dt.timedelta = dt.timedelta(seconds=30),
    connect_timeout: dt.timedelta = dt.timedelta(seconds=10),
    pool_size: int = 2,
    row_limit: int = 100,
    max_bytes: int = 64 * 1024,
    min_rows: int | None = None,
    max_rows: int | None = None,
    value_column: str | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
) -> dict[str, Any]:
    """Run an SQL query on PostgreSQL or MySQL/MariaDB; fail when an expectation does not hold.

    Options:
      dsn: postgresql://user@host:port/db or mysql://user@host:port/db, without a password.
      query: the SQL; placeholders $1, $2 (PostgreSQL) or %s (MySQL) for params.
      params: values bound to the placeholders (never formatted into the SQL).
      password_file: a file whose first line is the password (read when the pool opens).
      password_env: an environment variable holding it instead.
      statement_timeout: the server cancels a longer statement (default 30s); the client
        gives up 2 s later.
      connect_timeout: to get a connection (default 10s).
      pool_size: connections the job may hold (default 2; runs of an overlap="allow" job share).
      row_limit: rows kept in the result (default 100); max_bytes: their JSON size (64 KiB).
      min_rows, max_rows: fail when the query returns fewer or more rows.
      value_column: the column of the first row checked (default: the first column);
      min_value, max_value: fail when that value is below or above.

    Returns columns, rows (a table per row), row_count (exact unless more_rows), more_rows,
    truncated (null, "row_limit" or "max_bytes"), status (statements without rows), value,
    seconds.
    """
    target = _Target(dsn)
    for name, n, least in (("pool_size", pool_size, 1), ("row_limit", row_limit, 0)):
        if n < least:
            raise ValueError(f"sql_query: option {name!r} must be >= {least}, got {n}")
    cfg: dict[str, Any] = {
        "query": query,
        "params": list(params or []),
        "statement_timeout": _seconds(statement_timeout),
        "connect_timeout": _seconds(connect_timeout),
        "pool_size": pool_size,
        "row_limit": row_limit,
        "max_bytes": max_bytes,
        "min_rows": min_rows,
        "max_rows": max_rows,
        "value_column": value_column,
        "min_value": min_value,
        "max_value": max_value,
    }
    if cfg["statement_timeout"] <= 0 or cfg["connect_timeout"] <= 0:
        raise ValueError("sql_query: options 'statement_timeout' and 'connect_timeout' must be > 0")
    # Enough rows to decide every expectation, one more to know whether there were more.
    read = max(row_limit, min_rows or 0, (max_rows + 1) if max_rows is not None else 0) + 1
    is_pg = target.driver == "pg"
    _import(target.driver)  # before any pool: a missing driver fails with what to install

    async def opener() -> tuple[str | None, Any]:
        password = await _read_password(ctx, password_file, password_env)
        if is_pg:
            return password, await _pg_open(target, password, ctx.job, cfg)
        return password, await _mysql_open(target, password, cfg)

    @contextlib.asynccontextmanager
    async def holder() -> AsyncIterator[_Pool]:
        pools = _Pool(_pg_close if is_pg else _mysql_close)
        try:
            yield pools
        finally:
            await pools.aclose()

    pools = await ctx.resource("pool", holder)
    start = time.monotonic()
    try:
        pool = await pools.get(opener)
        run = _pg_run if is_pg else _mysql_run
        raw = await run(pool, cfg, read)
    except (SqlQueryError, ValueError):
        raise
    except Exception as exc:
        connection = (_pg_is_connection_error if is_pg else _mysql_is_connection_error)(exc)
        if connection:
            pools.broken = True  # the next run opens a new pool
        text = f"{type(exc).__name__}: {exc}"
        raise SqlQueryError(
            f"sql_query: {target.label}: {_scrub(text, pools.secret)}"
            + (" (the pool is replaced at the next run)" if connection else "")
        ) from None
    result = _shape(raw, cfg, read)
    result["seconds"] = round(time.monotonic() - start, 3)
    failed = _check(result, cfg)
    ctx.log.debug("sql_query done", rows=result["row_count"], seconds=result["seconds"])
    if failed:
        raise ExpectationFailed("sql_query: expectation failed: " + "; ".join(failed))
    return result


@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [taskd.JobType("sql_query", sql_query, kind="io")]
