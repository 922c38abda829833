"""The ``process`` executor (cpu jobs): the daemon's own worker processes (taskd.run.pool),
started on first use (a config without cpu jobs never forks) or warmed at start-up."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from taskd.run.encoding import Encoded
from taskd.run.executor._base import Call, ExecutorSettings
from taskd.run.executor.thread import _NoChecks

if TYPE_CHECKING:
    from taskd.plugin.jobtype import Kind
    from taskd.run.pool import ProcessPool


class ProcessExecutor(_NoChecks):
    """cpu runs in the process pool: one worker per run, killed and replaced on a timeout,
    a cancel or ``max_memory``."""

    name: ClassVar[str] = "process"
    kinds: ClassVar[frozenset[Kind]] = frozenset({"cpu"})
    _settings = "the pool's size is [daemon] process_workers"

    def __init__(self, settings: ExecutorSettings) -> None:
        self.workers = settings.process_workers
        # The started pool, else None: the runner reads it, one attribute, on every default
        # cpu run (Runtime.started_procs), so a started pool costs no coroutine per run.
        self.pool: ProcessPool | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self.started()

    async def started(self) -> ProcessPool:
        """The pool, started now if it is not yet (once, however many runs ask at once)."""
        if self.pool is None:
            async with self._lock:
                if self.pool is None:
                    from taskd.run.pool import ProcessPool

                    pool = ProcessPool(self.workers)
                    await pool.start()
                    self.pool = pool
        return self.pool

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        pool = self.pool or await self.started()
        return await pool.run_measured(
            call.func,
            (),
            call.kwargs,
            timeout=call.timeout,
            max_memory=call.max_memory,
            max_result=call.max_result,
            label=call.label,
        )

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        if self.pool is not None:
            if kill:
                self.pool.kill()
            await self.pool.close(timeout=0 if kill else timeout)

    def gauges(self) -> Mapping[str, float]:
        pool = self.pool
        if pool is None:
            return {"workers": 0, "busy": 0, "queued": 0}
        return {"workers": pool.size, "busy": pool.busy, "queued": pool.queued}
