"""The fleet's connection to PostgreSQL: the password, the pool, and whether the database is
up. A connection error flips the state to ``down`` at once, and from then on every call
fails fast (:class:`FleetDown`) until a reconnect task, retrying with backoff, gets a
``SELECT 1`` through. Nothing on a run's path ever waits for the database to come back."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg
import structlog

from taskd.config.secrets import PasswordUnavailable, SecretKeys, read_password

if TYPE_CHECKING:
    from taskd.config.model import FleetConfig

log = structlog.get_logger("taskd.fleet")

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
BACKOFF_MIN: Final = 0.5
BACKOFF_MAX: Final = 30.0
POOL_SIZE: Final = 4  # connections: claims, finishes, heartbeat and sweep (LISTEN has its own)

State = Literal["up", "down", "reconnecting", "refused"]


def to_ts(tick: float) -> datetime:
    """A tick (epoch seconds) as the timestamptz every host computes for it: rounded to the
    whole microsecond PostgreSQL keeps, by integer arithmetic (no float on the way back)."""
    return EPOCH + timedelta(microseconds=round(tick * 1_000_000))


def from_ts(ts: datetime) -> float:
    return (ts - EPOCH) / _US / 1_000_000


def version(ts: datetime | str | None) -> int | None:
    """A pause flag's version (its paused_at, a timestamptz or its ISO text in a notice) as
    whole µs: integers compare exactly."""
    if ts is None:
        return None
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    return (ts - EPOCH) // _US


def interval(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


class FleetDown(RuntimeError):
    """The fleet database cannot be reached now (a run's claim becomes a skip)."""


# What says the database (or the path to it) is gone, as opposed to a bug in a statement.
_GONE: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown (57P0x)
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections (53xxx)
)


def is_gone(exc: BaseException) -> bool:
    return isinstance(exc, _GONE)


KEYS: Final = SecretKeys(dsn="fleet.dsn", file="fleet.password_file", env="fleet.password_env")


async def password(cfg: FleetConfig) -> str | None:
    """The password from ``password_file`` or ``password_env``, never the DSN (the config
    refuses one there). Read at each connect, in a thread (a stat can hang on a dead
    network mount), so a rotated file is picked up by the next connection."""
    try:
        file = None if cfg.password_file is None else str(cfg.password_file)
        return await asyncio.to_thread(read_password, file, cfg.password_env, KEYS)
    except (PasswordUnavailable, ValueError) as exc:
        raise FleetDown(str(exc)) from None


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The pool's release without asyncpg's reset query (UNLISTEN *, RESET ALL, ...): our
    statements leave no session state behind (LISTEN has its own connection, the schema
    lock is a transaction's), and that query was one round trip more per claim."""


class Conn:
    """The pool (claims and finishes; heartbeat and sweep) and the up/down state."""

    def __init__(self, cfg: FleetConfig, node: str) -> None:
        self.cfg = cfg
        self.node = node
        self.state: State = "down"
        self.pool: asyncpg.Pool | None = None
        self.last_error = ""
        self._reconnect: asyncio.Task[None] | None = None
        self._on_up: list[Callable[[], Awaitable[None]]] = []
        self._on_down: list[Callable[[], None]] = []
        self._closed = False
        # A statement that hangs (a dead peer without a RST) must fail well within a lease.
        self.command_timeout = min(cfg.lease / 3, 5.0)

    def on_up(self, cb: Callable[[], Awaitable[None]]) -> None:
        """Call ``cb`` after each reconnect (not the first open): re-read pause flags,
        re-listen, catch up."""
        self._on_up.append(cb)

    def on_down(self, cb: Callable[[], None]) -> None:
        self._on_down.append(cb)

    async def connect_kwargs(self, app: str) -> dict[str, Any]:
        return {
            "dsn": self.cfg.dsn,
            "password": await password(self.cfg),
            "timeout": self.cfg.connect_timeout,
            "command_timeout": self.command_timeout,
            "server_settings": {"application_name": f"{app}:{self.node}"[:63]},
        }

    async def open(self) -> None:
        """The first connect: its failure is the caller's (a start error or a retry)."""
        self.pool = await asyncpg.create_pool(
            min_size=1, max_size=POOL_SIZE, reset=_no_reset, **(await self.connect_kwargs("taskd"))
        )
        self.state = "up"

    async def close(self) -> None:
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
            self.pool.terminate()

    @property
    def closed(self) -> bool:
        return self._closed

    def require(self) -> asyncpg.Pool:
        """The pool, or FleetDown at once while the database is down."""
        if self.state != "up" or self.pool is None:
            if self.state == "refused":
                raise FleetDown(self.last_error)
            raise FleetDown(f"fleet database unreachable: {self.last_error or self.state}")
        return self.pool

    def refuse(self, why: str) -> None:
        """For good (a schema too new, a node name in use): every call fails with ``why``
        and no reconnect is tried; a restart of taskd is needed."""
        self.state = "refused"
        self.last_error = why
        self._closed = True

    def gone(self, exc: BaseException) -> FleetDown:
        """Note a lost database (the state goes down, a reconnect starts) and return the
        error to raise."""
        text = f"{type(exc).__name__}: {exc}"[:300]
        if self.state == "refused":
            return FleetDown(self.last_error)
        if self.state == "up":
            self.state = "down"
            self.last_error = text
            log.warning("fleet_db_down", node=self.node, error=text)
            for cb in self._on_down:
                cb()
        if self._reconnect is None and not self._closed:
            self._reconnect = asyncio.get_running_loop().create_task(self._retry())
        return FleetDown(f"fleet database unreachable: {text}")

    async def _retry(self) -> None:
        delay = BACKOFF_MIN
        try:
            while not self._closed:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                self.state = "reconnecting"
                try:
                    if self.pool is None:
                        await self.open()
                    else:
                        await self.pool.expire_connections()  # the old ones died with the server
                        await self.pool.fetchval("SELECT 1")
                except Exception as exc:  # any failure is one more try
                    self.state = "down"
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                self.state = "up"
                self.last_error = ""
                log.info("fleet_db_up", node=self.node)
                break
        finally:
            self._reconnect = None
        for cb in self._on_up:
            try:
                await cb()
            except Exception as exc:  # one failed hook must not stop the others
                if is_gone(exc):
                    self.gone(exc)
                    return
                log.exception("fleet_reconnect_hook_failed", node=self.node)
