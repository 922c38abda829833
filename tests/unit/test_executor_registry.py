"""The executor registry and the daemon's live executors (taskd.run.executor)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
from structlog.testing import capture_logs

import taskd
from taskd.plugin.jobtype import Kind
from taskd.plugin.manager import PluginHost
from taskd.run.encoding import Encoded, encode
from taskd.run.executor import (
    DEFAULT_EXECUTOR,
    Call,
    ExecutorRegistry,
    ExecutorSettings,
    ExecutorType,
    builtin_registry,
)
from taskd.run.executor.live import Executors
from taskd.run.executor.thread import ThreadExecutor, _NoChecks
from taskd.run.runtime import Runtime
from taskd.state.shared import SharedState


class Inline(_NoChecks):
    """A plugin-style executor: runs the call on the loop, counting starts and closes."""

    name: ClassVar[str] = "inline"
    kinds: ClassVar[frozenset[Kind]] = frozenset({"cpu"})
    starts = 0

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.closed = False

    async def start(self) -> None:
        type(self).starts += 1

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        result = call.func(**call.kwargs)
        return result, encode(result, call.max_result)

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        self.closed = True

    def gauges(self) -> Mapping[str, float]:
        return {"up": 1.0}


def test_builtins_cover_every_kind_default() -> None:
    registry = builtin_registry()
    for kind, name in DEFAULT_EXECUTOR.items():
        found = registry.get(name)
        assert found is not None
        assert kind in found.kinds
    assert registry.names() == ["dask", "loop", "process", "thread"]


def test_a_name_is_registered_once() -> None:
    registry = builtin_registry()
    with pytest.raises(ValueError, match="'thread' is registered already"):
        registry.add(ThreadExecutor)


def test_a_name_must_be_an_identifier() -> None:
    class Bad(Inline):
        name: ClassVar[str] = "no good"

    with pytest.raises(ValueError, match="must be an identifier"):
        ExecutorRegistry().add(Bad)


def test_table_defaults_to_executors_name() -> None:
    registry = builtin_registry()
    registry.add(Inline)
    found = registry.get("inline")
    assert found is not None
    assert found.table == "executors.inline"


async def test_a_plugin_executor_is_made_and_started_once_then_closed() -> None:
    registry = builtin_registry()
    registry.add(Inline)
    seen: list[str] = []

    def settings(kind: ExecutorType) -> ExecutorSettings:
        seen.append(kind.name)
        return ExecutorSettings(table={"x": 1})

    live = Executors(registry, settings)
    Inline.starts = 0
    first = await live.start("inline")
    assert await live.start("inline") is first
    assert Inline.starts == 1
    assert isinstance(first, Inline)
    assert first.settings.table == {"x": 1}
    assert "inline" in seen
    assert live.gauges()["inline"] == {"up": 1.0}
    value, encoded = await first.run(Call(dict, {"a": 3}, None, None, 100, "l", "k"))
    assert value == {"a": 3}
    assert encoded is not None
    with pytest.raises(KeyError):
        await live.start("nope")
    await live.close(kill=False, timeout=1)
    assert first.closed


class Broken(Inline):
    """A plugin executor whose figures and close raise (a bug in its plugin)."""

    name: ClassVar[str] = "broken"

    def gauges(self) -> Mapping[str, float]:
        raise RuntimeError("gauges blew up")

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        raise RuntimeError("close blew up")


async def test_an_executor_that_raises_costs_only_its_own_figures_and_close() -> None:
    registry = builtin_registry()
    registry.add(Broken)
    registry.add(Inline)
    live = Executors(registry, lambda kind: ExecutorSettings())
    await live.start("broken")  # made first: closed before inline
    inline = await live.start("inline")
    with capture_logs() as logs:
        figures = live.gauges()
        assert live.gauges() == figures  # the second time: no second log line
        await live.close(kill=False, timeout=1)
    assert figures["inline"] == {"up": 1.0}
    assert "broken" not in figures
    assert inline.closed  # closed after the broken one raised
    failed = [(e["event"], e["executor"], e["error"]) for e in logs if "executor" in e]
    assert failed == [
        ("executor_gauges_failed", "broken", "RuntimeError: gauges blew up"),
        ("executor_close_failed", "broken", "RuntimeError: close blew up"),
    ]


class Gate(Inline):
    """A plugin executor whose runs wait for a gate to open."""

    name: ClassVar[str] = "gate"

    def __init__(self, settings: ExecutorSettings) -> None:
        super().__init__(settings)
        self.gate = asyncio.Event()

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        await self.gate.wait()
        return await super().run(call)


async def test_an_executor_no_job_names_after_a_reload_is_closed_once_its_runs_end() -> None:
    registry = builtin_registry()
    registry.add(Gate)
    live = Executors(registry, lambda kind: ExecutorSettings())
    gate = await live.start("gate")
    assert isinstance(gate, Gate)
    run = asyncio.ensure_future(live.run("gate", Call(dict, {"a": 1}, None, None, 100, "l", "k")))
    await asyncio.sleep(0)
    live.retire_unused(set())  # a reload removed every job naming it: its run goes on
    assert not gate.closed
    assert "gate" in live.live
    gate.gate.set()
    assert (await run)[0] == {"a": 1}
    await live.settle()
    assert gate.closed
    assert "gate" not in live.live
    assert "gate" not in live.gauges()
    again = await live.start("gate")  # a later reload naming it again gets a new one
    assert again is not gate
    live.retire_unused({"gate"})
    assert not again.closed
    await live.close(kill=False, timeout=1)
    assert again.closed


async def test_runtime_default_paths_read_the_builtins() -> None:
    rt = Runtime(shared=SharedState(), host=PluginHost(), thread_workers=1, process_workers=1)
    try:
        assert rt.started_procs is None  # lazy: no cpu run yet
        assert rt.threads is rt.executors.thread.runner
        assert "process" not in rt.executors.live
        pool = await rt.procs()
        assert rt.started_procs is pool is rt.process.pool
    finally:
        await rt.close(kill=True)
    assert pool.size == 0


class InlinePlugin:
    @taskd.hookimpl
    def taskd_executors(self, register: ExecutorRegistry) -> None:
        register.add(Inline)


class ClashPlugin:
    @taskd.hookimpl
    def taskd_executors(self, register: ExecutorRegistry) -> None:
        register.add(Inline)
        register.add(ThreadExecutor)  # a built-in's name: this plugin is broken


def test_a_plugin_adds_an_executor_through_the_hook() -> None:
    host = PluginHost.load(entry_points=False, extra=[InlinePlugin()])
    found = host.executors.get("inline")
    assert found is not None
    assert found.cls is Inline
    assert not host.broken


def test_a_plugin_that_registers_a_taken_name_is_broken_and_adds_nothing() -> None:
    host = PluginHost.load(entry_points=False, extra=[ClashPlugin()])
    assert [r.error for r in host.broken] == [
        "taskd_executors() failed: ValueError: executor 'thread' is registered already"
    ]
    assert "inline" not in host.executors  # what it registered before the clash is dropped


def test_taskd_executors_must_be_a_plain_def() -> None:
    class AsyncPlugin:
        @taskd.hookimpl
        async def taskd_executors(self, register: ExecutorRegistry) -> None:
            register.add(Inline)

    host = PluginHost.load(entry_points=False, extra=[AsyncPlugin()])
    assert "taskd_executors must be a plain def" in (host.broken[0].error or "")
    assert "inline" not in host.executors
