"""The daemon's end of the control socket: accept, check the peer, read lines, answer.

Everything runs on the daemon's own event loop (uvloop or asyncio). Each connection is one
Task that reads a request, awaits the command handler *in that same Task*, writes the reply,
and repeats; so cancelling a connection (on close) cancels only its own handler call."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from taskd.control.peer import allowed, peer_credentials, who_may_connect
from taskd.control.protocol import (
    ControlError,
    ErrorCode,
    decode_request,
    encode_error,
    encode_ok,
)
from taskd.control.socketfile import (
    BACKLOG,
    MAX_SOCKET_PATH,
    ControlSocketError,
    bind,
    check_existing,
    lookup_group,
    make_parent,
    unlink_quietly,
)

log = structlog.get_logger("taskd.control")

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]

# While a request is being handled (a `trigger --wait`, a reload), how often to look whether
# its client has gone: a gone client's request is dropped, and its slot freed.
GONE_CHECK = 1.0


class ControlServer:
    """Serves the control protocol (see :mod:`taskd.control.protocol`) on a UNIX socket.

    ``handler(cmd, args)`` returns JSON-able data for the reply, or raises ControlError to
    refuse (its code and message are sent), or raises anything else (logged with its
    traceback; the client gets ``internal`` and a one-line message). It runs in the
    connection's own Task and is cancelled when the server closes, so a handler that waits on
    something shared (a run's future) must wrap it in :func:`asyncio.shield`.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        group: str | None = None,
        max_clients: int = 64,
        max_line: int = 64 * 1024,
        read_timeout: float = 10.0,
    ) -> None:
        if max_clients < 1 or max_line < 1 or read_timeout <= 0:
            raise ValueError("max_clients, max_line and read_timeout must be positive")
        self.path = Path(path)
        self.group = group
        self.max_clients = max_clients
        self.max_line = max_line
        self.read_timeout = read_timeout
        self._handler = handler
        self._group_gid: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we made
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: one per connection
        self._gone: set[asyncio.Task[None]] = set()  # connections cancelled: client went away
        self._closing = False

    @property
    def clients(self) -> int:
        """How many clients are connected now."""
        return len(self._tasks)

    @property
    def serving(self) -> bool:
        """Started and not yet closed."""
        return self._server is not None and not self._closing

    # -- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the socket and start accepting. The caller holds the single-instance lock.

        Raises ControlSocketError (a StateError) when the path cannot be used, and
        SocketInUseError when another live daemon is serving on it."""
        if self._server is not None or self._closing:
            raise RuntimeError("a ControlServer is started once")
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ControlSocketError(
                f"control socket path {self.path} is {len(os.fsencode(self.path))} bytes; a "
                f"UNIX socket path may have at most {MAX_SOCKET_PATH}: choose a shorter "
                "daemon.runtime_dir"
            )
        self._group_gid = lookup_group(self.group)
        make_parent(self.path, self.group, self._group_gid)
        check_existing(self.path)
        sock, tmp = bind(self.path, self.group, self._group_gid)
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, sock=sock, limit=self.max_line, backlog=BACKLOG
            )
            st = os.lstat(tmp)
            self._bound = (st.st_dev, st.st_ino)
            # Listening before the rename: no client can find the path and be refused.
            os.rename(tmp, self.path)
        except BaseException:
            if self._server is not None:
                self._server.close()
                self._server = None
            else:
                sock.close()
            unlink_quietly(tmp)
            self._bound = None
            raise
        log.debug("control_listening", path=str(self.path), group=self.group)

    # -- connections -------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: the cap is decided before any await, and the
        # connection Task is ours to keep a reference to and to cancel.
        if self._closing:
            _write_and_close(writer, encode_error(ErrorCode.STOPPING, "taskd is stopping"))
            return
        if len(self._tasks) >= self.max_clients:
            log.warning("control_busy", clients=len(self._tasks), max_clients=self.max_clients)
            _write_and_close(
                writer,
                encode_error(
                    ErrorCode.BUSY,
                    f"taskd has {len(self._tasks)} control connections open, the most it "
                    "takes; try again in a moment",
                ),
            )
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid = uid = gid = -1
        handling = False  # a request is in the handler: a cancel leaves it unanswered
        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            if not allowed(pid, uid, gid, self._group_gid):
                log.warning("control_forbidden", pid=pid, uid=uid, gid=gid)
                hint = "" if self.group else "; set daemon.control_group to let a group in"
                await self._send(
                    writer,
                    encode_error(
                        ErrorCode.FORBIDDEN,
                        f"uid {uid} may not use the control socket; allowed: "
                        f"{who_may_connect(self.group)}{hint}",
                    ),
                )
                return
            while not self._closing:
                line = await self._read_line(reader, writer)
                if line is None:
                    return
                handling = True
                stop_watching = self._watch_for_hangup(reader)
                try:
                    reply = await self._dispatch(line, pid, uid)
                finally:
                    stop_watching()
                handling = False
                if not await self._send(writer, reply):
                    return
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me in self._gone:
                # The client hung up while its request was handled: nobody to answer.
                self._gone.discard(me)
                if me is not None:
                    me.uncancel()
                log.info("control_client_gone", pid=pid, uid=uid)
                return
            # close(): a running handler is cancelled with us; tell its client why the request
            # ends unanswered. No await: we are being cancelled.
            if handling:
                _write_and_close(
                    writer,
                    encode_error(
                        ErrorCode.STOPPING,
                        "taskd is stopping; the request was not finished (a run it started goes on "
                        "until the drain ends: see taskd history)",
                    ),
                )
            raise
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("control_connection_failed", pid=pid, uid=uid)
        finally:
            writer.close()

    def _watch_for_hangup(self, reader: asyncio.StreamReader) -> Callable[[], None]:
        """While a request is handled, cancel the connection if its client hangs up (EOF with
        nothing left unread), so a Ctrl-C'd `trigger --wait` does not hold a slot until its
        run ends. Returns the function that stops watching."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        handle: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal handle
            if reader.at_eof() and task is not None:
                self._gone.add(task)
                task.cancel()
            else:
                handle = loop.call_later(GONE_CHECK, check)

        handle = loop.call_later(GONE_CHECK, check)

        def stop() -> None:
            if handle is not None:
                handle.cancel()

        return stop

    async def _read_line(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """The next request line, or None when the connection is over (after any reply)."""
        try:
            async with asyncio.timeout(self.read_timeout):
                return await reader.readuntil(b"\n")
        except TimeoutError:
            await self._send(
                writer,
                encode_error(
                    ErrorCode.TIMEOUT,
                    f"no complete request line within {self.read_timeout:g} s; closing",
                ),
            )
        except asyncio.LimitOverrunError:
            # Nothing more is read: the reader holds at most about 2 * max_line bytes.
            await self._send(
                writer,
                encode_error(
                    ErrorCode.TOO_LONG,
                    f"request line longer than {self.max_line} bytes; closing",
                ),
            )
        except asyncio.IncompleteReadError as exc:  # the client closed its end
            if exc.partial.strip():
                await self._send(
                    writer,
                    encode_error(
                        ErrorCode.BAD_REQUEST, "the request line does not end with a newline"
                    ),
                )
        except ConnectionError:
            pass
        return None

    async def _dispatch(self, line: bytes, pid: int, uid: int) -> bytes:
        try:
            cmd, args = decode_request(line)
        except ControlError as exc:
            return encode_error(exc.code, exc.message)
        try:
            data = await self._handler(cmd, args)
            return encode_ok(data)
        except ControlError as exc:
            return encode_error(exc.code, exc.message)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Something the handler awaited was cancelled, not this connection.
            log.warning("control_handler_cancelled", cmd=cmd, pid=pid, uid=uid)
            return encode_error(
                ErrorCode.INTERNAL, f"{cmd!r} was cancelled inside taskd before it finished"
            )
        except Exception as exc:
            log.exception("control_handler_failed", cmd=cmd, pid=pid, uid=uid)
            return encode_error(
                ErrorCode.INTERNAL,
                f"taskd failed on {cmd!r} ({type(exc).__name__}); the daemon's log has the details",
            )

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Write one reply; False when the client is gone or stopped reading."""
        try:
            writer.write(data)
            async with asyncio.timeout(self.read_timeout):
                await writer.drain()
        except TimeoutError:  # before OSError, its base class
            log.info("control_client_not_reading", timeout=self.read_timeout)
            # A plain close() would wait for the unread reply to drain, that is for ever.
            writer.transport.abort()
            return False
        except (ConnectionError, OSError, RuntimeError):
            # RuntimeError: uvloop refuses a write to a transport that is closing.
            return False
        return True

    # -- close -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop accepting, cancel every connection (and any handler running in it), and
        remove the socket file if it is still the one this server bound. Idempotent.

        Safe to call from a handler: its own connection is not cancelled, and ends after its
        reply is sent (a later close() from outside a handler waits for it)."""
        if not self._closing:
            self._closing = True
            if self._server is not None:
                self._server.close()
            self._unlink_if_ours()
            log.debug("control_closed", path=str(self.path))
        me = asyncio.current_task()
        others = [t for t in self._tasks if t is not me]
        for task in others:
            task.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)

    def _unlink_if_ours(self) -> None:
        if self._bound is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("control_unlink_failed", path=str(self.path), error=str(exc))
        self._bound = None


def _write_and_close(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Queue a last reply and close; the transport flushes it. Never raises."""
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        writer.write(data)
    writer.close()
