"""A real aiohttp server on loopback for the HTTP plugins' tests (http_check, notify_webhook).

It runs on an event loop in a thread of its own, so a test can use it from synchronous code
(against a real daemon process) as well as from an async test on pytest's loop. It counts
connections on the server side (accepted, and open now) and records the webhook payloads it
receives. With ``tls=True`` it also listens with a self-signed certificate made by the
``openssl`` command (``cert`` is the file a client can trust as its CA).

Endpoints:
  /ok                 200 "all good"
  /status/{code}      that status
  /slow?s=SECONDS     answers after a delay
  /reset              resets the connection (RST) without answering
  /redirect           302 to /ok
  /moved/{rest}       301 to /ok (a webhook that moved, e.g. http -> https)
  /loop/{rest}        302 to itself (a redirect loop)
  /echo               200 with the method and headers as JSON
  /big?n=BYTES        200 with a body of n bytes
  /hook               POST: records the JSON payload; answers ``hook_status`` after ``hook_delay``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web


def make_cert(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, made by the openssl CLI.
    Returns (cert, key); the cert is also what a client trusts as its CA file."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class LoopbackServer:
    """The server and what it saw. Use as a context manager or call start()/stop()."""

    def __init__(self, *, tls_dir: Path | None = None) -> None:
        self.tls_dir = tls_dir
        self.cert: Path | None = None
        self.port = 0
        self.tls_port = 0
        self.accepted = 0  # connections accepted since start (or reset_counts)
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.hooks: list[Any] = []  # JSON payloads POSTed to /hook
        self.inflight = 0  # /slow requests being answered now
        self.max_inflight = 0  # the most at once
        self.hook_status = 200
        self.hook_delay = 0.0  # seconds before /hook answers (a hung webhook: large)
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    # -- what it saw -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://localhost:{self.tls_port}"

    def open_connections(self) -> int:
        """Connections open now, as the server's sockets see them."""
        with self._lock:
            return len(self._open)

    def wait_open(self, want: int, timeout: float = 10.0) -> None:
        """Wait until exactly ``want`` connections are open (a client's close takes a moment
        to reach the server)."""
        deadline = time.monotonic() + timeout
        while self.open_connections() != want:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"wanted {want} open connections, have {self.open_connections()}"
                )
            time.sleep(0.02)

    def received(self) -> list[Any]:
        with self._lock:
            return list(self.hooks)

    def wait_hooks(self, count: int, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.received()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"wanted {count} webhook payloads, got {self.received()}")
            time.sleep(0.02)
        return self.received()

    # -- handlers ----------------------------------------------------------------------------

    def _note(self, request: web.Request) -> None:
        with self._lock:
            self.requests.append((request.method, request.path))

    async def _ok(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.Response(text="all good")

    async def _status(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.Response(status=int(request.match_info["code"]), text="status")

    async def _slow(self, request: web.Request) -> web.Response:
        self._note(request)
        with self._lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(float(request.query.get("s", "5")))
        finally:
            with self._lock:
                self.inflight -= 1
        return web.Response(text="slow but fine")

    async def _reset(self, request: web.Request) -> web.Response:
        self._note(request)
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        # SO_LINGER 0: close() sends a RST instead of a FIN, as a crashing peer would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return web.Response(text="never sent")  # the connection is gone: aiohttp drops it

    async def _redirect(self, request: web.Request) -> web.Response:
        self._note(request)
        raise web.HTTPFound("/ok")

    async def _moved(self, request: web.Request) -> web.Response:
        self._note(request)
        raise web.HTTPMovedPermanently("/ok")

    async def _redirect_loop(self, request: web.Request) -> web.Response:
        self._note(request)
        raise web.HTTPFound(request.path)

    async def _echo(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.json_response({"method": request.method, "headers": dict(request.headers)})

    async def _big(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.Response(body=b"x" * int(request.query.get("n", "1000")))

    async def _hook(self, request: web.Request) -> web.Response:
        self._note(request)
        payload = await request.json()
        with self._lock:
            self.hooks.append(payload)
        if self.hook_delay:
            await asyncio.sleep(self.hook_delay)
        return web.Response(status=self.hook_status, text="ok")

    # -- life --------------------------------------------------------------------------------

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/ok", self._ok)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/reset", self._reset)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_route("*", "/moved/{rest}", self._moved)
        app.router.add_route("*", "/loop/{rest}", self._redirect_loop)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_get("/big", self._big)
        app.router.add_post("/hook", self._hook)
        # A client that hangs up cancels its handler (a /slow answer nobody waits for), and a stop
        # does not wait for handlers long.
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=2.0,
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        made, lost = server.connection_made, server.connection_lost

        # Counted at the socket's level: aiohttp's own list keeps a connection whose handler
        # still runs (a slow answer to a client that has gone) until the handler ends.
        def counted_made(handler: Any, transport: asyncio.Transport) -> None:
            with self._lock:
                self.accepted += 1
                self._open.add(handler)
            made(handler, transport)

        def counted_lost(handler: Any, exc: BaseException | None = None) -> None:
            with self._lock:
                self._open.discard(handler)
            lost(handler, exc)

        server.connection_made = counted_made  # type: ignore[method-assign]
        server.connection_lost = counted_lost  # type: ignore[method-assign]
        self._runner = runner
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = _port_of(site)
        if self.tls_dir is not None:
            import ssl

            self.cert, key = make_cert(self.tls_dir)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.cert, key)
            tls_site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            await tls_site.start()
            self.tls_port = _port_of(tls_site)
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self._main, name="loopback-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise AssertionError("the loopback server did not start within 60 s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_of(site: web.TCPSite) -> int:
    server = site._server  # the asyncio.Server: aiohttp offers no public way to the bound port
    assert isinstance(server, asyncio.base_events.Server)
    return int(server.sockets[0].getsockname()[1])


@contextlib.contextmanager
def loopback_server(tls_dir: Path | None = None) -> Iterator[LoopbackServer]:
    """A started server, stopped at the end (for a pytest fixture's body)."""
    with LoopbackServer(tls_dir=tls_dir) as server:
        yield server


def dumps(obj: Any) -> str:
    """JSON for TOML: a JSON string is a valid TOML basic string."""
    return json.dumps(obj)
