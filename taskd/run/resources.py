"""Long-lived resources an io job's runs share: an HTTP session, a connection pool.

Opening a session or a pool per run defeats the point of aiohttp, asyncpg or aiomysql, so a
job asks its context for one: ``await ctx.resource("db", lambda: asyncpg.create_pool(dsn))``.
The factory returns an async context manager; taskd enters it on the first run that asks,
hands the same value to every later run, and exits it when the job no longer needs it:

- the job is changed by a reload (its next run gets a fresh resource, built from the new
  options) or removed, once the runs still using the old one have ended;
- the daemon stops, after the drain.

A factory or ``__aenter__`` that fails fails the run that asked, and nothing is kept: the next
run tries again. Closing never raises into the daemon: a failure or a hang (bounded by
CLOSE_TIMEOUT) is logged with the job and the key.

The resources of one job *generation* (one spec between reloads) live in a Scope. A run holds
the scope it first used until it ends, so a reload that changes the job cannot close a pool
under a run that is still using it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

T = TypeVar("T")
Factory = Callable[[], AbstractAsyncContextManager[T]]
CLOSE_TIMEOUT = 10.0  # seconds a scope's resources get to close before they are abandoned


class ResourceClosed(RuntimeError):
    """A resource was asked of a scope that is closing (the daemon is stopping)."""


class Scope:
    """The resources of one job generation, in the order they were opened."""

    __slots__ = ("_locks", "_stack", "_values", "closing", "job", "retired", "users")

    def __init__(self, job: str) -> None:
        self.job = job
        self._values: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._stack = AsyncExitStack()
        self.users = 0  # runs holding this scope
        self.retired = False  # no new run will get it; closed once users reach 0
        self.closing = False

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._values)

    async def get(self, key: str, factory: Factory[T]) -> T:
        if key in self._values:
            return self._values[key]  # type: ignore[no-any-return]
        if not isinstance(key, str) or not key:
            raise TypeError(f"ctx.resource: key must be a non-empty string, got {key!r}")
        # One opening per key even when runs overlap: the second waits for the first's value.
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._values:
                return self._values[key]  # type: ignore[no-any-return]
            if self.closing:
                raise ResourceClosed(
                    f"job {self.job!r}: resource {key!r} asked for while the daemon stops"
                )
            manager = factory()
            if not (hasattr(manager, "__aenter__") and hasattr(manager, "__aexit__")):
                raise TypeError(
                    f"ctx.resource({key!r}, factory): the factory must return an async context "
                    f"manager (like aiohttp.ClientSession() or asyncpg.create_pool(...)), got "
                    f"{type(manager).__qualname__}; wrap other objects with "
                    f"contextlib.asynccontextmanager"
                )
            # Entered before it is remembered: a failure here keeps nothing, so the next run
            # tries again; a cancelled run (timeout) likewise leaves no half-open resource.
            value = await self._stack.enter_async_context(manager)
            self._values[key] = value
            return value

    async def close(self, log: FilteringBoundLogger) -> None:
        """Exit every resource, newest first. Never raises; bounded by CLOSE_TIMEOUT."""
        if self.closing and not self._values:
            return
        self.closing = True
        keys = list(self._values)
        self._values.clear()
        if not keys:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._stack.aclose()
        except TimeoutError:
            log.error(
                "resource_close_timeout",
                job=self.job,
                resources=keys,
                timeout=CLOSE_TIMEOUT,
                hint="a resource's __aexit__ hung; it was abandoned",
            )
        except Exception as exc:
            log.error(
                "resource_close_failed",
                job=self.job,
                resources=keys,
                error=f"{type(exc).__name__}: {exc}",
            )
        else:
            log.info("resources_closed", job=self.job, resources=keys)


class Resources:
    """Every job's current scope, and the retired scopes still in use or closing."""

    def __init__(self, log: FilteringBoundLogger) -> None:
        self.log = log
        self._current: dict[str, Scope] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._retired: set[Scope] = set()
        self._stopped = False

    def acquire(self, job: str) -> Scope:
        """The job's current scope, held by one more run until :meth:`release`."""
        scope = self._current.get(job)
        if scope is None:
            scope = self._current[job] = Scope(job)
            if self._stopped:
                scope.closing = True
        scope.users += 1
        return scope

    def release(self, scope: Scope) -> None:
        scope.users -= 1
        if scope.retired and scope.users <= 0:
            self._close_later(scope)

    def retire(self, job: str) -> None:
        """The job was changed or removed: its next run gets a new scope; the old one closes
        once the runs still holding it have ended."""
        scope = self._current.pop(job, None)
        if scope is None:
            return
        scope.retired = True
        if scope.users <= 0:
            self._close_later(scope)
        else:
            self._retired.add(scope)

    def open_count(self) -> int:
        """Resources open now, in every scope (for status and tests)."""
        return sum(len(s) for s in self._current.values()) + sum(len(s) for s in self._retired)

    def _close_later(self, scope: Scope) -> None:
        self._retired.discard(scope)
        if not len(scope):
            scope.closing = True
            return
        task = asyncio.get_running_loop().create_task(
            scope.close(self.log), name=f"taskd-resources-close-{scope.job}"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        """At stop, after the drain: close every scope, whoever still holds it."""
        self._stopped = True
        scopes = [*self._current.values(), *self._retired]
        self._current.clear()
        self._retired.clear()
        waits = [asyncio.ensure_future(s.close(self.log)) for s in scopes if len(s)]
        waits.extend(self._closing)
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)
        for s in scopes:
            s.closing = True
