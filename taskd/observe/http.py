"""The HTTP endpoint on ``daemon.metrics_address``: ``/metrics``, ``/healthz`` and the status
page at ``/``, served by aiohttp on the daemon's own event loop.

Served on the loop on purpose: ``/healthz`` answering at all is the proof that the loop turns,
and every handler reads the daemon's state where it lives, without locks. Read only: GET (and
HEAD) routes, nothing that starts or changes anything. Imported only when the address is set,
so a daemon without it never imports aiohttp or prometheus_client."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from taskd.errors import StateError
from taskd.observe.metrics import DaemonCollector, MetricsSink, sink_of

if TYPE_CHECKING:
    from taskd.daemon import Daemon

log = structlog.get_logger("taskd.observe")

BLOCKED_RECENTLY = 10.0  # seconds after a blocked loop during which /healthz answers 503
SHUTDOWN_GRACE = 1.0  # seconds an in-flight request may take once the server closes


class MetricsAddressError(StateError):
    """``daemon.metrics_address`` cannot be listened on: in use, not an address of this host,
    not allowed, or a host name that does not resolve."""


def split_address(address: str) -> tuple[str | None, int]:
    """``"host:port"`` -> (host, port); ``"[::1]:9464"`` -> ("::1", 9464); an empty host
    (``":9464"``) is None, every interface."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f'expected "host:port" such as "127.0.0.1:9464", got {address!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or None, int(port)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/`` on ``address`` for ``daemon``.

    :meth:`start` binds (raising :class:`MetricsAddressError` when it cannot) and adds the
    metrics sink to ``daemon.rt``'s run sinks, so start it once the Runtime exists and before
    jobs run. Port 0 binds a free port; :attr:`port` is the one bound."""

    def __init__(self, address: str, daemon: Daemon) -> None:
        self.address = address
        self.daemon = daemon
        self.sink = MetricsSink()
        # /metrics serves collector.exposition(); the registry is for other prometheus_client
        # consumers. Private: the global one would add prometheus_client's own process and GC
        # collectors, and a second daemon in the same process (the tests) would clash.
        self.registry = CollectorRegistry()
        self.collector = DaemonCollector(daemon, self.sink)
        self.registry.register(self.collector)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The base URL actually served (the bound port, not 0)."""
        host, _ = split_address(self.address)
        host = host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen. Raises MetricsAddressError (a StateError) naming the address, the OS error
        and what to do."""
        host, port = split_address(self.address)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/", self._page)
        # No access log: a scrape every few seconds would drown the run lines.
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=False).start()
        except OSError as exc:
            await runner.cleanup()
            raise MetricsAddressError(self._bind_failed(exc)) from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        if self.daemon.rt is not None:
            self.sink = self.collector.sink = sink_of(self.daemon.rt, self.sink)
        log.info("metrics_listening", address=self.address, url=self.url)

    def _bind_failed(self, exc: OSError) -> str:
        code = exc.errno
        if code == errno.EADDRINUSE:
            hint = (
                "another process listens there (`ss -ltnp` shows which); stop it or set "
                "another daemon.metrics_address"
            )
        elif code == errno.EADDRNOTAVAIL:
            hint = "this host has no such address; use one of its addresses, or 127.0.0.1"
        elif code in (errno.EACCES, errno.EPERM):
            hint = "ports below 1024 need privileges; use a higher port such as 9464"
        elif isinstance(exc, socket.gaierror):
            hint = "the host name does not resolve; use an IP address"
        else:
            hint = "check daemon.metrics_address"
        return f"cannot listen on daemon.metrics_address {self.address!r}: {exc} ({hint})"

    async def close(self) -> None:
        """Stop listening and detach the sink; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        rt = self.daemon.rt
        if rt is not None and self.sink in rt.sinks:
            rt.sinks.remove(self.sink)

    # -- handlers ---------------------------------------------------------------------------

    def _poke(self) -> None:
        # A request is work on the loop: an idle daemon's loop watch is parked (loopwatch.py).
        poke = getattr(self.daemon.loopwatch, "poke", None)
        if poke is not None:
            poke()

    async def _metrics(self, request: web.Request) -> web.Response:
        self._poke()
        collector = self.collector
        parts: list[bytes] = []
        try:
            for piece in collector.job_pieces():
                parts.append(piece.encode())
                # 10,000 jobs are ~400,000 lines: let runs start and end between pieces
                # rather than hold the loop for the whole scrape.
                await asyncio.sleep(0)
            parts.append(collector.daemon_text())
        except Exception:  # a scrape must not take the server down; the log says why
            log.exception("metrics_failed")
            return web.Response(status=500, text="collecting metrics failed; see the log")
        return web.Response(body=b"".join(parts), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        self._poke()
        body = health(self.daemon)
        return web.json_response(body, status=200 if body["ok"] else 503, headers=_NO_STORE)

    async def _page(self, request: web.Request) -> web.Response:
        self._poke()
        # Imported here: the page is only rendered when someone opens it.
        from taskd.control.commands import Commands
        from taskd.control.protocol import ControlError
        from taskd.observe.page import CSP, render

        try:
            status = await Commands(self.daemon).cmd_status({})
        except ControlError as exc:  # still starting: no job table yet
            raise web.HTTPServiceUnavailable(text=str(exc)) from None
        text = render(status, failures=recent_failures(self.daemon), lag=lag(self.daemon))
        headers = {**_NO_STORE, "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
        return web.Response(text=text, content_type="text/html", headers=headers)


_NO_STORE = {"Cache-Control": "no-store"}


def health(daemon: Daemon) -> dict[str, Any]:
    """What /healthz answers: ``ok`` is true when nothing below is wrong; ``problems`` names
    each thing that is (``starting``, ``reload_failed``, ``loop_blocked``)."""
    problems: list[str] = []
    body: dict[str, Any] = {"ok": True, "problems": problems}
    if daemon.jobset is None:
        problems.append("starting")
    last = daemon.reloader.last if daemon.reloader is not None else None
    if last is not None:
        body["reload"] = {"ok": last.ok, "at": last.at}
        if not last.ok:
            problems.append("reload_failed")
            body["reload"]["errors"] = list(last.errors)
    watch = getattr(daemon, "loopwatch", None)
    blocked_recently = getattr(watch, "blocked_recently", None)
    body["loop"] = lag(daemon)
    if blocked_recently is not None and blocked_recently(BLOCKED_RECENTLY):
        problems.append("loop_blocked")
        body["loop"]["blocked_within"] = BLOCKED_RECENTLY
    body["ok"] = not problems
    body["stopping"] = daemon.stopping
    body["uptime"] = round(time.time() - daemon.started_at, 3)
    return body


def lag(daemon: Daemon) -> dict[str, float]:
    """The loop lag for the page and /healthz: ``last``, ``max``, ``threshold`` (seconds);
    empty while the daemon has no loop watch."""
    watch = getattr(daemon, "loopwatch", None)
    if watch is None:
        return {}
    out: dict[str, float] = {}
    for key, attr in (("last", "lag"), ("max", "lag_max"), ("threshold", "threshold")):
        value = getattr(watch, attr, None)
        if isinstance(value, int | float):
            out[key] = float(value)
    if "threshold" not in out and daemon.loaded is not None:
        threshold = getattr(daemon.loaded.config.daemon, "loop_block_threshold", None)
        if isinstance(threshold, int | float):
            out["threshold"] = float(threshold)
    return out


def recent_failures(daemon: Daemon) -> list[dict[str, Any]]:
    """The newest failed runs first, as the page shows them."""
    rt = daemon.rt
    if rt is None:
        return []
    return [
        {
            "job": f.job,
            "run_id": f.run_id,
            "outcome": str(f.outcome),
            "started": f.started,
            "duration": f.duration,
            "error": f.error,
        }
        for f in reversed(rt.stats.recent_failures)
    ]
