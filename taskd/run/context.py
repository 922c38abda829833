"""JobContext: what an ``io`` job receives as its first argument."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from structlog.typing import FilteringBoundLogger

    from taskd.run.resources import Resources, Scope
    from taskd.state.shared import SharedState

T = TypeVar("T")


class Offloader(Protocol):
    """Where a context sends steps that must leave the loop; the daemon provides it."""

    async def to_thread(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

    async def to_process(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...


class _Daemon(Offloader, Protocol):
    """What :meth:`JobContext.for_run` takes from the daemon's Runtime."""

    log: FilteringBoundLogger
    shared: SharedState
    resources: Resources

    def fleet_state(self, job: str, fence: int) -> SharedState: ...


_new = object.__new__


class _LocalOffloader:
    """Fallback used outside a daemon (tests, ``taskd exec``): asyncio's default thread pool
    and a fresh one-off process pool per call."""

    async def to_thread(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(func, *args, **kwargs)

    async def to_process(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        from concurrent.futures import ProcessPoolExecutor

        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max_workers=1) as pool:
            return await loop.run_in_executor(pool, functools.partial(func, *args, **kwargs))


class JobContext:
    """The run an ``io`` job is part of, and the daemon's services it may use.

    Attributes: ``job`` (its name in the config), ``run_id``, ``attempt`` (1 for the first try),
    ``scheduled`` (the tick this run belongs to, an aware UTC datetime), ``log`` (a structlog
    logger bound to job and run id), ``state`` (the :class:`~taskd.state.shared.SharedState`),
    ``fence`` (a fleet run's fencing token; None for a host run). Long-lived resources (a session, a pool) come from :meth:`resource`.
    """

    # log and scheduled are made on first use: most jobs never touch them, and a burst of
    # 10,000 runs should not pay for 10,000 bound loggers and datetimes it does not need.
    __slots__ = (
        "_base_log",
        "_fence",
        "_log",
        "_offload",
        "_resources",
        "_scheduled",
        "_scope",
        "attempt",
        "job",
        "run_id",
        "state",
    )

    def __init__(
        self,
        *,
        job: str,
        run_id: str,
        attempt: int,
        scheduled: datetime | float,
        log: FilteringBoundLogger | None = None,
        state: SharedState,
        offload: Offloader | None = None,
        base_log: FilteringBoundLogger | None = None,
        resources: Resources | None = None,
        fence: int | None = None,
    ) -> None:
        self.job = job
        self.run_id = run_id
        self.attempt = attempt
        self._scheduled = scheduled
        self._log = log
        self._base_log = base_log
        self.state = state
        self._offload: Offloader = offload or _LocalOffloader()
        # The daemon's registry; None outside a daemon until a resource is asked for.
        self._resources = resources
        self._scope: Scope | None = None  # held from the first resource() to the run's end
        self._fence = fence

    @classmethod
    def for_run(
        cls,
        job: str,
        run_id: str,
        attempt: int,
        scheduled: float,
        rt: _Daemon,
        fence: int | None = None,
    ) -> JobContext:
        """The context of one attempt of a daemon's run (the runner's hot path): the same
        object ``__init__`` makes, without its keyword parsing and defaults, a quarter of
        its cost."""
        ctx = _new(cls)
        ctx.job = job
        ctx.run_id = run_id
        ctx.attempt = attempt
        ctx._scheduled = scheduled
        ctx._log = None
        ctx._base_log = rt.log
        # A fleet run's state is the fleet's, its writes fenced (taskd.fleet.state).
        ctx.state = rt.shared if fence is None else rt.fleet_state(job, fence)
        ctx._offload = rt
        ctx._resources = rt.resources
        ctx._scope = None
        ctx._fence = fence
        return ctx

    @property
    def fence(self) -> int | None:
        """The fencing token of this run's fleet claim (``scope = "fleet"``): it grows with
        every claim of the job's ticks, and a newer one means another host took this run
        over. A store of the job's own accepts a write only with a fence not older than the
        newest it has seen (``UPDATE ... SET fence = $f WHERE fence <= $f``). None for a
        host run."""
        return self._fence

    @property
    def scheduled(self) -> datetime:
        """The tick this run belongs to, an aware UTC datetime."""
        if not isinstance(self._scheduled, datetime):
            self._scheduled = datetime.fromtimestamp(self._scheduled, UTC)
        return self._scheduled

    @property
    def log(self) -> FilteringBoundLogger:
        """A structlog logger bound to job, run id and attempt."""
        if self._log is None:
            base = (
                self._base_log if self._base_log is not None else structlog.get_logger("taskd.job")
            )
            self._log = base.bind(job=self.job, run_id=self.run_id, attempt=self.attempt)
        return self._log

    async def to_thread(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in the daemon's thread pool and await its result."""
        return await self._offload.to_thread(func, *args, **kwargs)

    async def to_process(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a module-level, picklable function in the daemon's process pool."""
        return await self._offload.to_process(func, *args, **kwargs)

    async def resource(self, key: str, factory: Callable[[], AbstractAsyncContextManager[T]]) -> T:
        """This job's long-lived resource ``key``, opened on first use with ``factory``.

        ``factory()`` returns an async context manager (``aiohttp.ClientSession()``,
        ``asyncpg.create_pool(dsn)``, ``aiomysql.create_pool(...)``, or your own
        ``contextlib.asynccontextmanager``); its value is kept for this job's later runs and
        exited when a reload changes or removes the job, or the daemon stops. A factory that
        fails fails this run, and the next run tries again."""
        scope = self._scope
        if scope is None:
            if self._resources is None:
                from taskd.run.resources import Resources

                self._resources = Resources(self.log)
            scope = self._scope = self._resources.acquire(self.job)
        return await scope.get(key, factory)

    def release_resources(self) -> None:
        """The run is over: let a retired scope close. Called by the daemon (and the test kit);
        a job never needs to."""
        scope, self._scope = self._scope, None
        if scope is not None and self._resources is not None:
            self._resources.release(scope)

    def __repr__(self) -> str:
        return f"<JobContext job={self.job!r} run_id={self.run_id!r} attempt={self.attempt}>"
