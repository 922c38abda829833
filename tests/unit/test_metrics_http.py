"""MetricsServer on a real socket: /metrics parses, /healthz says why it is unhealthy, the page
is served read-only, and an address that cannot be bound is a clear StateError."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from structlog.testing import capture_logs

from taskd.errors import StateError
from taskd.observe.http import MetricsAddressError, MetricsServer, split_address
from taskd.observe.loopwatch import LoopWatch
from taskd.observe.metrics import MetricsSink
from taskd.reload import ReloadResult
from taskd.run.runtime import Runtime
from taskd.schedule.jobset import JobSet
from tests.unit.test_metrics import FakeDaemon, known_runs, of, parse, specs
from tests.unit.test_scheduler import wait_until

pytestmark = pytest.mark.timeout(30)

Serve = Callable[..., Any]


@pytest.fixture
async def serve(rt: Runtime) -> AsyncIterator[Serve]:
    """``await serve(address="127.0.0.1:0")`` -> (server, daemon, session): a MetricsServer
    over a FakeDaemon with jobs ok, bad, slow; everything closed after the test."""
    servers: list[MetricsServer] = []
    jobs = JobSet(rt)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def create(address: str = "127.0.0.1:0") -> tuple[MetricsServer, FakeDaemon, Any]:
        daemon = FakeDaemon(rt, jobs)
        server = MetricsServer(address, daemon)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server, daemon, session

    with capture_logs():
        jobs.apply(specs("ok", "bad", "slow"), {})
        yield create
        await session.close()
        for server in servers:
            await server.close()
        for job in jobs.everyone():
            job.stop()
        tasks = jobs.tasks()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await rt.close(kill=True)


async def get(session: Any, url: str) -> tuple[int, dict[str, str], str]:
    async with session.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def get_json(session: Any, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        return resp.status, await resp.json()


class TestMetrics:
    """GET /metrics is the Prometheus text format, with the daemon's families."""

    async def test_scrape_parses_after_runs(self, serve: Serve) -> None:
        server, daemon, session = await serve()
        assert server.port and server.port > 0
        await known_runs(daemon)
        status, headers, body = await get(session, f"{server.url}/metrics")
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE_LATEST
        families, s = parse(body)
        assert of(s, "taskd_runs_total", job_name="ok", outcome="succeeded") == 3
        assert of(s, "taskd_run_duration_seconds_count", job_name="bad") == 1
        assert {"taskd_build_info", "taskd_worker_restarts", "taskd_reload_last_success"} <= set(
            families
        )

    async def test_start_attaches_the_sink_and_close_detaches_it(
        self, serve: Serve, rt: Runtime
    ) -> None:
        server, _, _ = await serve()
        assert [s for s in rt.sinks if isinstance(s, MetricsSink)] == [server.sink]
        await server.close()
        assert not any(isinstance(s, MetricsSink) for s in rt.sinks)
        await server.close()  # twice is fine

    async def test_read_only(self, serve: Serve) -> None:
        server, _, session = await serve()
        for path in ("/metrics", "/healthz", "/"):
            async with session.post(f"{server.url}{path}") as resp:
                assert resp.status == 405
        async with session.get(f"{server.url}/nothing") as resp:
            assert resp.status == 404


class TestHealthz:
    """200 while the loop turns and no reload failed; 503 naming each problem otherwise."""

    async def test_healthy(self, serve: Serve) -> None:
        server, _, session = await serve()
        status, body = await get_json(session, f"{server.url}/healthz")
        assert status == 200
        assert body["ok"] is True and body["problems"] == []

    async def test_failed_reload_then_a_good_one(self, serve: Serve) -> None:
        server, daemon, session = await serve()
        bad = ReloadResult(ok=False, at=time.time(), errors=("taskd.toml:3: jobs.x: no type",))
        daemon.reloader.last = bad
        status, body = await get_json(session, f"{server.url}/healthz")
        assert status == 503
        assert body["ok"] is False and body["problems"] == ["reload_failed"]
        assert body["reload"]["errors"] == ["taskd.toml:3: jobs.x: no type"]
        daemon.reloader.last = ReloadResult(ok=True, at=time.time())
        status, body = await get_json(session, f"{server.url}/healthz")
        assert status == 200 and body["reload"]["ok"] is True

    async def test_loop_blocked_recently(self, serve: Serve) -> None:
        server, daemon, session = await serve()
        asked: list[float] = []

        def blocked_recently(seconds: float) -> bool:
            asked.append(seconds)
            return True

        daemon.loopwatch = SimpleNamespace(
            lag=0.0, lag_max=1.5, threshold=0.25, blocked_recently=blocked_recently
        )
        status, body = await get_json(session, f"{server.url}/healthz")
        assert status == 503 and body["problems"] == ["loop_blocked"]
        assert asked == [10.0]
        assert body["loop"]["max"] == 1.5 and body["loop"]["threshold"] == 0.25

    async def test_while_and_after_the_loop_is_blocked(self, serve: Serve) -> None:
        """With the real LoopWatch: a request sent while the loop is blocked is answered once
        it turns again, with 503 loop_blocked; the blocked-loop counter moves."""
        server, daemon, session = await serve()
        watch = LoopWatch(0.05, lambda job: [], interval=0.01)
        watch.start(asyncio.get_running_loop())
        daemon.loopwatch = watch
        try:
            status, body = await get_json(session, f"{server.url}/healthz")
            assert status == 200, body
            loop = asyncio.get_running_loop()
            loop.call_soon(time.sleep, 0.3)  # a job that blocks the loop
            status, body = await get_json(session, f"{server.url}/healthz")
            assert status == 503 and body["problems"] == ["loop_blocked"]
            await wait_until(lambda: watch.blocked_total == 1)
            _, _, text = await get(session, f"{server.url}/metrics")
            _, s = parse(text)
            assert of(s, "taskd_event_loop_blocked_total") == 1
            assert (of(s, "taskd_event_loop_lag_max_seconds") or 0) >= 0.2
        finally:
            watch.stop()

    async def test_starting(self, serve: Serve) -> None:
        server, daemon, session = await serve()
        daemon.jobset = None
        status, body = await get_json(session, f"{server.url}/healthz")
        assert status == 503 and body["problems"] == ["starting"]
        status, _, _ = await get(session, f"{server.url}/")
        assert status == 503


class TestPage:
    """GET / is the status page, with its Content-Security-Policy as a header too."""

    async def test_page(self, serve: Serve) -> None:
        server, daemon, session = await serve()
        await known_runs(daemon)
        status, headers, body = await get(session, f"{server.url}/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        for job in ("ok", "bad", "slow"):
            assert job in body
        assert "ValueError: boom" in body  # the recent failure


class TestAddress:
    """Binding: IPv4, IPv6 in brackets, and clear errors."""

    @pytest.mark.parametrize(
        ("address", "expect"),
        [
            ("127.0.0.1:9464", ("127.0.0.1", 9464)),
            ("[::1]:9464", ("::1", 9464)),
            (":9464", (None, 9464)),
            ("localhost:0", ("localhost", 0)),
        ],
    )
    def test_split(self, address: str, expect: tuple[str | None, int]) -> None:
        assert split_address(address) == expect

    async def test_in_use(self, serve: Serve) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(MetricsAddressError) as caught:
                await serve(f"127.0.0.1:{port}")
        assert isinstance(caught.value, StateError)
        text = str(caught.value)
        assert f"'127.0.0.1:{port}'" in text and "daemon.metrics_address" in text
        assert "in use" in text and "another process listens there" in text

    async def test_not_an_address_of_this_host(self, serve: Serve) -> None:
        with pytest.raises(MetricsAddressError, match=r"192\.0\.2\.1:9464.*no such address"):
            await serve("192.0.2.1:9464")  # TEST-NET-1: never local

    async def test_ipv6(self, serve: Serve) -> None:
        if not socket.has_ipv6:
            pytest.skip("no IPv6 here")
        try:
            server, _, session = await serve("[::1]:0")
        except MetricsAddressError as exc:
            pytest.skip(f"no ::1 here: {exc}")
        assert server.url.startswith("http://[::1]:")
        status, _, _ = await get(session, f"{server.url}/metrics")
        assert status == 200


def test_daemon_without_metrics_imports_neither_library() -> None:
    """aiohttp and prometheus_client cost start-up time and memory: only a daemon with
    metrics_address set may import them (through taskd.observe.http)."""
    code = (
        "import sys, taskd.daemon, taskd.cli, taskd.control.commands, taskd.observe\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'prometheus_client'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=20
    )
    assert out.stdout.strip() == "[]"
