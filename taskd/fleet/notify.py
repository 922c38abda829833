"""The LISTEN connection of a node: fleet-wide pause notices (pg_notify on taskd_fleet), on a
connection of its own so a notice never waits behind a claim. Losing it alone is no lost
database: it is opened again with backoff and the flags re-read; claims go on meanwhile
(each checks the job's flag itself). After a lost database, the reconnect opens it again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from taskd.fleet import sql
from taskd.fleet.conn import BACKOFF_MAX, BACKOFF_MIN, Conn, FleetDown, log, version


class Listener:
    def __init__(self, conn: Conn, node: str) -> None:
        self.conn = conn
        self.node = node
        self._listen: asyncpg.Connection | None = None
        self._notice: Callable[[str, bool, str, int | None], None] | None = None
        self._resync: Callable[[], Awaitable[None]] | None = None
        self._listen_again: asyncio.Task[None] | None = None
        conn.on_up(self._back_up)

    async def close(self) -> None:
        if self._listen_again is not None:
            self._listen_again.cancel()
        listen, self._listen = self._listen, None  # first: its close is no lost connection
        if listen is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listen.close(), 2)
            listen.terminate()

    async def listen(
        self,
        notice: Callable[[str, bool, str, int | None], None],
        resync: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Call ``notice(job, paused, by, version)`` for each pause notice, on its own connection.
        A lost LISTEN connection alone is opened again with backoff, then ``resync`` runs
        (the notices missed meanwhile: re-read the flags); the claims go on meanwhile (each
        checks the flag itself). A lost database is the reconnect's to handle."""
        self._notice = notice
        self._resync = resync
        await self._relisten()

    async def _back_up(self) -> None:
        """The database is back (a reconnect hook): listen again. A failure here is this
        listener's alone (its own retry, with backoff), never the database marked down
        again: the pool answered, and claims check the pause flag themselves."""
        if self._notice is None:
            return
        try:
            await self._relisten()
        except Exception as exc:
            log.warning("fleet_listen_failed", node=self.node,
                        error=f"{type(exc).__name__}: {exc}"[:300])  # fmt: skip
            self._listen = None
            if self._listen_again is None and not self.conn.closed:
                self._listen_again = asyncio.get_running_loop().create_task(self._again())

    async def _relisten(self) -> None:
        if self._notice is None:
            return
        old, self._listen = self._listen, None
        if old is not None:
            old.terminate()
        conn = await asyncpg.connect(**(await self.conn.connect_kwargs("taskd-listen")))
        await conn.add_listener(sql.CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_listen_lost)
        self._listen = conn

    def _on_notify(self, _c: Any, _pid: int, _ch: str, payload: object) -> None:
        if self._notice is None:
            return
        try:
            msg = json.loads(str(payload))
            at = msg.get("at")
            self._notice(str(msg["job"]), bool(msg["paused"]), str(msg.get("by") or ""),
                         None if at is None else version(str(at)))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            log.warning("fleet_notice_bad", payload=str(payload)[:200])

    def _on_listen_lost(self, conn: Any) -> None:
        if conn is not self._listen or self.conn.closed:
            return
        self._listen = None
        log.warning("fleet_listen_lost", node=self.node)
        if self._listen_again is None:
            self._listen_again = asyncio.get_running_loop().create_task(self._again())

    async def _again(self) -> None:
        delay = BACKOFF_MIN
        try:
            while not self.conn.closed and self._listen is None:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                if self.conn.state != "up":
                    return  # the database is down: its reconnect listens again
                try:
                    await self._relisten()
                except Exception:  # any failure is one more try
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                log.info("fleet_listen_back", node=self.node)
                if self._resync is not None:
                    with contextlib.suppress(FleetDown):
                        await self._resync()
        finally:
            self._listen_again = None
