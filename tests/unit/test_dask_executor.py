"""DaskExecutor on its own, against real sockets and a real LocalCluster helper: what its
start and its runs do when the cluster is not there or does not answer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

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
