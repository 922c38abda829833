"""DaskExecutor on its own, against real sockets and a real LocalCluster helper: what its
start and its runs do when the cluster is not there or does not answer."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator

import psutil
import pytest

from taskd.errors import JobTimeout
from taskd.run.executor._base import Call, ExecutorSettings

pytest.importorskip("distributed")

from taskd.run.executor.dask import DaskExecutor
from taskd.run.executor.dask_helper import DaskUnavailable


@pytest.fixture
def silent() -> Iterator[str]:
    """A scheduler address that accepts connections and never says a word."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"


def quick() -> int:
    return 1


def call(timeout: float | None, key: str = "r1-1") -> Call:
    return Call(quick, {}, timeout, None, 1 << 20, f"job 'j' run {key}", key)


class TestASilentScheduler:
    """An address that accepts TCP but never answers."""

    async def test_the_start_gives_up_after_connect_timeout(self, silent: str) -> None:
        ex = DaskExecutor(ExecutorSettings({"scheduler": silent, "connect_timeout": "1s"}))
        try:
            with pytest.raises(DaskUnavailable, match="unreachable: no answer within 1s"):
                await asyncio.wait_for(ex.start(), 20)  # 20 s: the hang this is about
            assert ex.client is None
        finally:
            await ex.close(kill=True, timeout=0)

    async def test_a_run_ends_by_its_timeout_while_the_start_waits(self, silent: str) -> None:
        ex = DaskExecutor(ExecutorSettings({"scheduler": silent, "connect_timeout": "60s"}))
        try:
            with pytest.raises(JobTimeout):
                await asyncio.wait_for(ex.run(call(0.5)), 20)
        finally:
            await ex.close(kill=True, timeout=0)


def helpers() -> list[int]:
    """This process's live dask_local helpers."""
    found = []
    for proc in psutil.Process().children():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "dask_local" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


async def until(check: Callable[[], object], timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still not so after {timeout}s")


def getpid(key: str) -> Call:
    """A run of ``os.getpid`` (importable on any worker, so it goes by reference)."""
    return Call(os.getpid, {}, None, None, 1 << 20, f"job 'j' run {key}", key)


class TestACancelWhileTheLocalClusterStarts:
    """The first run is cancelled while the cluster it waits for comes up."""

    @pytest.mark.parametrize("when", ["helper spawned", "helper up"])
    async def test_the_start_goes_on_for_the_next_run_and_close_ends_it(self, when: str) -> None:
        ex = DaskExecutor(ExecutorSettings({"scheduler": "local", "workers": 1}))
        try:
            first = asyncio.ensure_future(ex.run(getpid("a-1")))
            if when == "helper spawned":
                await until(helpers)
            else:
                await until(lambda: ex.helper is not None)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert (await asyncio.wait_for(ex.run(getpid("a-2")), 60))[0] > 0
            assert len(helpers()) == 1  # the one cluster the first run started
        finally:
            await ex.close(kill=False, timeout=5)
        await until(lambda: not helpers(), 10)

    async def test_close_during_the_start_ends_the_helper(self) -> None:
        ex = DaskExecutor(ExecutorSettings({"scheduler": "local", "workers": 1}))
        starting = asyncio.ensure_future(ex.start())
        await until(helpers)
        await ex.close(kill=True, timeout=0)
        with pytest.raises(DaskUnavailable, match="its start was stopped"):
            await starting  # not a CancelledError: its caller was not cancelled
        await until(lambda: not helpers(), 10)
