"""The executors of one daemon: made when first needed, started once, closed at the stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from taskd.run.encoding import Encoded
from taskd.run.executor._base import Call, Executor, ExecutorSettings
from taskd.run.executor.process import ProcessExecutor
from taskd.run.executor.registry import ExecutorRegistry, ExecutorType
from taskd.run.executor.thread import ThreadExecutor
from taskd.run.limits import describe

log = structlog.get_logger("taskd.executors")


class Executors:
    """Executor instances by name. ``thread`` and ``process`` always exist (the default
    blocking and cpu paths read them directly); any other is made and started on its
    first run (or by :meth:`warm`), so a daemon whose jobs use none pays nothing for it."""

    def __init__(
        self,
        registry: ExecutorRegistry,
        settings: Callable[[ExecutorType], ExecutorSettings],
    ) -> None:
        self.registry = registry
        self._settings = settings
        self.thread = ThreadExecutor(settings(_builtin(registry, "thread")))
        self.process = ProcessExecutor(settings(_builtin(registry, "process")))
        # Started executors: what a run of a job that names one looks up (a dict read).
        self.live: dict[str, Executor] = {"thread": self.thread}
        self._made: dict[str, Executor] = {"thread": self.thread, "process": self.process}
        self._locks: dict[str, asyncio.Lock] = {}
        self._gauges_failed: set[str] = set()
        self._busy: dict[str, int] = {}  # runs in flight through run(), by executor
        self._unused: set[str] = set()  # named by no job since the last reload
        self._closing: set[asyncio.Task[None]] = set()  # retired ones being closed

    async def start(self, name: str) -> Executor:
        """The executor ``name``, made and started now if it is not yet (once, however many
        runs ask at once). Raises KeyError for a name no one registered, and whatever its
        start raises (the run fails with it; the next run tries again)."""
        executor = self.live.get(name)
        if executor is not None:
            return executor
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            executor = self.live.get(name)
            if executor is None:
                executor = self._made.get(name)
                if executor is None:
                    kind = self.registry.get(name)
                    if kind is None:
                        raise KeyError(name)
                    executor = self._made[name] = kind.make(self._settings(kind))
                await executor.start()
                self.live[name] = executor
        return executor

    async def run(self, name: str, call: Call) -> tuple[Any, Encoded]:
        """One attempt on executor ``name`` (a job that named one other than its kind's
        default), started first if it is not yet. Counted while in flight, so an executor a
        reload left unused is closed only once its last run has ended."""
        busy = self._busy
        busy[name] = busy.get(name, 0) + 1
        try:
            executor = self.live.get(name) or await self.start(name)
            return await executor.run(call)
        finally:
            busy[name] -= 1
            if not busy[name] and name in self._unused:
                self._retire(name)

    def retire_unused(self, named: set[str]) -> None:
        """After a reload: close the executors made that no job names now (a local dask
        cluster would otherwise run until the daemon stops), each once its runs in flight
        have ended (a removed job's run finishes, retries included, where it started).
        One named again before that is kept."""
        self._unused = {n for n in self._made if n not in ("thread", "process", *named)}
        for name in list(self._unused):
            if not self._busy.get(name):
                self._retire(name)

    def _retire(self, name: str) -> None:
        # It stays in _unused until the next reload: one made again for a removed job's
        # retry is closed after that run as well.
        self.live.pop(name, None)
        executor = self._made.pop(name, None)
        if executor is None:
            return
        log.info("executor_retired", executor=name, reason="no job names it since a reload")
        task = asyncio.ensure_future(self._close_one(name, executor, kill=False, timeout=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def settle(self) -> None:
        """Wait for the retired executors being closed."""
        if self._closing:
            await asyncio.wait(set(self._closing))

    def set_registry(self, registry: ExecutorRegistry) -> None:
        """A reload's plugins: executors started already stay as they are."""
        self.registry = registry

    def made_with_tables(
        self, old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]
    ) -> list[str]:
        """The tables of executors made already that differ between ``old`` and ``new``."""
        changed = []
        for name in self._made:
            kind = self.registry.get(name)
            if kind is not None and old.get(kind.table) != new.get(kind.table):
                changed.append(kind.table)
        return changed

    def gauges(self) -> dict[str, Mapping[str, float]]:
        """Each executor's figures, by name: every one made, started or not (a dask
        cluster that never came up shows ``up`` 0, not nothing), but the process pool only
        once started, as before. One whose gauges raise (a plugin's bug) is left out,
        logged the first time: status and /metrics still answer."""
        figures: dict[str, Mapping[str, float]] = {}
        for name, ex in self._made.items():
            if name == "process" and name not in self.live:
                continue
            try:
                figures[name] = ex.gauges()
            except Exception as exc:
                if name not in self._gauges_failed:
                    self._gauges_failed.add(name)
                    log.warning("executor_gauges_failed", executor=name, error=describe(exc, 500))
        return figures

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        """Close every executor made, the process pool first and the threads last (as the
        daemon always has): a plugin's executor may still hand work to threads. One whose
        close raises is logged, and the others are closed all the same."""
        made = self._made
        order = [n for n in made if n not in ("process", "thread")]
        for name in ("process", *order, "thread"):
            await self._close_one(name, made[name], kill=kill, timeout=timeout)
        await self.settle()

    async def _close_one(
        self, name: str, executor: Executor, *, kill: bool, timeout: float | None
    ) -> None:
        try:
            await executor.close(kill=kill, timeout=timeout)
        except Exception as exc:
            log.error("executor_close_failed", executor=name, error=describe(exc, 500))


def _builtin(registry: ExecutorRegistry, name: str) -> ExecutorType:
    kind = registry.get(name)
    assert kind is not None, f"built-in executor {name!r} missing from the registry"
    return kind
