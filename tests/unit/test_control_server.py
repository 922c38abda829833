"""The control socket: a real ControlServer on a real UNIX socket, real clients (the blocking
client in a thread, raw sockets, child processes of another uid), on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from structlog.testing import capture_logs

from taskd.control import (
    PROTOCOL_VERSION,
    ControlError,
    ControlServer,
    ControlSocketError,
    ErrorCode,
    NoDaemon,
    SocketInUseError,
    allowed,
    request,
)
from taskd.control.protocol import decode_reply, decode_request, encode_request
from taskd.errors import StateError

pytestmark = pytest.mark.timeout(10)

PEER_USER = "taskd-test-peer"
PEER_GROUP = "taskd-test-ctl"
FLOOD_CAP = 16 * 2**20  # a flooding client gives up after this much: the server must stop first

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def handle(cmd: str, args: dict[str, Any]) -> Any:
    """The test command table."""
    if cmd == "echo":
        return {"cmd": cmd, "args": args}
    if cmd == "refuse":
        raise ControlError(ErrorCode.REFUSED, "job 'x' was not run: paused; resume it first")
    if cmd == "boom":
        raise ValueError("secret detail from deep inside")
    if cmd == "sleep":
        await asyncio.sleep(float(args.get("seconds", 0.1)))
        return "slept"
    raise ControlError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {cmd!r}")


@contextlib.asynccontextmanager
async def served(path: Path, handler: Handler = handle, **kw: Any) -> AsyncIterator[ControlServer]:
    server = ControlServer(path, handler, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def call(path: Path, cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
    """The CLI's blocking client, in a thread so the server on this loop can answer."""
    return await asyncio.to_thread(request, path, cmd, args, **kw)


async def exchange(path: Path, data: bytes, replies: int = 1) -> list[dict[str, Any]]:
    """Send raw bytes, read ``replies`` reply lines, then expect the server to keep the
    connection open (no EOF) only if it should; returns the decoded replies."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        await writer.drain()
        return [json.loads(await asyncio.wait_for(reader.readline(), 2)) for _ in range(replies)]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    assert reply["v"] == PROTOCOL_VERSION
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


async def eventually(check: Callable[[], bool], within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def on_uvloop(coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def exists(path: Path) -> bool:
    return os.path.lexists(path)


def put_obstacle(path: Path, kind: str) -> str:
    """Something that is not a socket at ``path``; returns what describe() says of it."""
    path.parent.mkdir()
    if kind == "file":
        path.write_text("precious")
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to("/dev/null")
    return describe(path)


def describe(path: Path) -> str:
    if path.is_symlink():
        return f"symlink to {os.readlink(path)}"
    if path.is_dir():
        return f"dir {sorted(os.listdir(path))}"
    return f"file {path.read_text()!r}"


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    """Where the server puts its socket; the directory does not exist yet."""
    return tmp_path / "run" / "control.sock"


# -- scenarios run on both loops ---------------------------------------------------------------


async def round_trip(path: Path) -> None:
    async with served(path) as server:
        args = {"job": "backup", "n": [1, 2.5, None], "text": "grüße ✓"}
        assert await call(path, "echo", args) == {"cmd": "echo", "args": args}
        assert await call(path, "echo") == {"cmd": "echo", "args": {}}
        # Three requests in one write, one bad in the middle: three replies, in order.
        lines = encode_request("echo", {"i": 1}) + b"not json\n" + encode_request("echo", {"i": 3})
        first, second, third = await exchange(path, lines, replies=3)
        assert first == {"v": 1, "ok": True, "data": {"cmd": "echo", "args": {"i": 1}}}
        assert error_of(second)[0] == "bad_request"
        assert third["data"]["args"] == {"i": 3}
        await eventually(lambda: server.clients == 0)


async def handler_errors(path: Path) -> None:
    async with served(path):
        with pytest.raises(ControlError) as info:
            await call(path, "refuse")
        assert info.value.code == ErrorCode.REFUSED
        assert info.value.message == "job 'x' was not run: paused; resume it first"

        with capture_logs() as logs:
            (reply,) = await exchange(path, encode_request("boom"))
        code, message = error_of(reply)
        assert code == "internal"
        assert "'boom'" in message
        assert "\n" not in message
        assert "Traceback" not in message
        assert "secret detail" not in message
        (failed,) = [e for e in logs if e["event"] == "control_handler_failed"]
        assert failed["cmd"] == "boom"
        assert failed["exc_info"], "the traceback goes to the log"
        assert failed["log_level"] == "error"
        # The server survived: the next client is served.
        assert await call(path, "echo", {"after": "boom"}) == {
            "cmd": "echo",
            "args": {"after": "boom"},
        }


async def flood(path: Path) -> None:
    """A client that sends an endless line: the server answers too_long and stops reading,
    so the client's writes fail long before FLOOD_CAP (memory stays bounded)."""

    def send_forever() -> tuple[int, bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            sent = 0
            chunk = b"x" * 65536
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while sent < FLOOD_CAP:
                    s.sendall(chunk)
                    sent += len(chunk)
            return sent, s.makefile("rb").readline()

    async with served(path, max_line=64 * 1024) as server:
        sent, line = await asyncio.to_thread(send_forever)
        code, message = error_of(json.loads(line))
        assert code == "too_long"
        assert "65536 bytes" in message
        assert sent < FLOOD_CAP, "the server kept reading an endless line"
        await eventually(lambda: server.clients == 0)
        assert await call(path, "echo") == {"cmd": "echo", "args": {}}


async def idle_timeout(path: Path) -> None:
    async with served(path, read_timeout=0.3) as server:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"v": 1, "cmd": "ec')  # and never the rest
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 2)
        code, message = error_of(json.loads(line))
        assert code == "timeout"
        assert "0.3 s" in message
        assert await asyncio.wait_for(reader.read(), 2) == b"", "closed after the timeout"
        writer.close()
        await eventually(lambda: server.clients == 0)


async def close_cancels_running_handler(path: Path) -> None:
    started = asyncio.Event()
    saw_cancel: list[bool] = []
    never = asyncio.Event()

    async def waiting(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "echo":
            return "echo"
        started.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            saw_cancel.append(True)
            raise
        return "unreachable"

    bystander = asyncio.create_task(asyncio.sleep(30))  # unrelated work on the same loop
    server = ControlServer(path, waiting)
    await server.start()
    idle_reader, idle_writer = await asyncio.open_unix_connection(str(path))
    pending = asyncio.create_task(call(path, "trigger", {"wait": True}, timeout=None))
    try:
        idle_writer.write(encode_request("echo"))
        assert json.loads(await asyncio.wait_for(idle_reader.readline(), 2))["data"] == "echo"
        await asyncio.wait_for(started.wait(), 2)
        await asyncio.wait_for(server.close(), 2)
        with pytest.raises(ControlError) as info:
            await asyncio.wait_for(pending, 2)
        assert info.value.code == ErrorCode.STOPPING
        assert saw_cancel == [True]
        # A client between requests just sees the end: no reply it did not ask for.
        assert await asyncio.wait_for(idle_reader.read(), 2) == b""
        assert not bystander.done(), "closing the server cancelled a task that was not its own"
        assert not exists(path)
        assert server.clients == 0
        await server.close()  # idempotent
    finally:
        idle_writer.close()
        bystander.cancel()
        await server.close()
        await asyncio.gather(pending, return_exceptions=True)


async def busy(path: Path) -> None:
    """100 idle clients against max_clients=64: 36 are told busy at once, the 64 held open do
    not stall the loop, and a slot that frees up serves a normal request."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def first_line(reader: asyncio.StreamReader, within: float) -> bytes | None:
        try:
            return await asyncio.wait_for(reader.readline(), within)
        except TimeoutError:
            return None

    async with served(path, max_clients=64, read_timeout=1.5) as server:
        timer = asyncio.create_task(ticker())
        conns = [await asyncio.open_unix_connection(str(path)) for _ in range(100)]
        try:
            firsts = await asyncio.gather(*(first_line(r, 0.3) for r, _ in conns))
            busy_replies = [json.loads(x) for x in firsts if x is not None]
            assert len(busy_replies) == 36
            assert {error_of(r)[0] for r in busy_replies} == {"busy"}
            assert server.clients == 64
            with pytest.raises(ControlError) as info:
                await call(path, "echo")
            assert info.value.code == ErrorCode.BUSY
            # Free one held slot: the next request is served while 63 clients sit idle.
            idle = [(r, w) for (r, w), x in zip(conns, firsts, strict=True) if x is None]
            idle[0][1].close()
            await eventually(lambda: server.clients == 63)
            assert await call(path, "echo", {"x": 1}) == {"cmd": "echo", "args": {"x": 1}}
            assert ticks >= 10, "the loop stalled while clients were connected"
            # The idle ones are dropped after read_timeout, each with a timeout reply.
            lasts = await asyncio.gather(*(first_line(r, 3) for r, _ in idle[1:]))
            assert {error_of(json.loads(x or b"null"))[0] for x in lasts} == {"timeout"}
            await eventually(lambda: server.clients == 0)
        finally:
            timer.cancel()
            for _, w in conns:
                w.close()


async def never_reads(path: Path) -> None:
    """A client that pipelines requests and never reads: dropped once a reply cannot be
    written within read_timeout (not kept for ever by a close that waits to flush)."""
    request_line = encode_request("echo", {"pad": "p" * 30_000})

    def send_never_read() -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            sent = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while sent < FLOOD_CAP:
                    s.sendall(request_line)
                    sent += len(request_line)
            return sent

    async with served(path, read_timeout=0.3) as server:
        with capture_logs() as logs:
            sent = await asyncio.to_thread(send_never_read)
        assert sent < FLOOD_CAP, "the server kept answering a client that does not read"
        assert [e for e in logs if e["event"] == "control_client_not_reading"]
        await eventually(lambda: server.clients == 0)
        assert await call(path, "echo") == {"cmd": "echo", "args": {}}


SCENARIOS = [
    round_trip,
    handler_errors,
    flood,
    never_reads,
    idle_timeout,
    close_cancels_running_handler,
    busy,
]


class TestRequests:
    """Requests and replies over a real socket with the real client."""

    async def test_round_trip_and_several_requests_on_one_connection(self, sock: Path) -> None:
        await round_trip(sock)

    async def test_handler_errors_become_replies_and_the_server_survives(self, sock: Path) -> None:
        await handler_errors(sock)

    async def test_unknown_command_is_the_handlers_answer(self, sock: Path) -> None:
        async with served(sock):
            with pytest.raises(ControlError) as info:
                await call(sock, "frobnicate")
            assert (info.value.code, info.value.message) == (
                "unknown_command",
                "unknown command 'frobnicate'",
            )

    @pytest.mark.parametrize("v", ["2", "0", "true", '"1"', "1.0", "null"])
    async def test_other_protocol_version(self, sock: Path, v: str) -> None:
        async with served(sock):
            line = f'{{"v": {v}, "cmd": "echo"}}\n'.encode()
            # The connection stays usable: a good request after the bad one is answered.
            bad, good = await exchange(sock, line + encode_request("echo"), replies=2)
            code, message = error_of(bad)
            assert code == "version"
            assert f"version {v}" in message
            assert "speaks version 1" in message
            assert good["ok"] is True

    @pytest.mark.parametrize(
        ("line", "fragment"),
        [
            (b"{not json\n", "not valid JSON"),
            (b"[1, 2]\n", "a request is a JSON object, got an array"),
            (b'"echo"\n', "got a string"),
            (b"\n", "not valid JSON"),
            (b'{"v": 1}\n', '"cmd" is missing'),
            (b'{"v": 1, "cmd": 5}\n', '"cmd" must be a non-empty string, got a number'),
            (b'{"v": 1, "cmd": ""}\n', "must be a non-empty string"),
            (b'{"v": 1, "cmd": "echo", "args": [1]}\n', '"args" must be an object, got an array'),
            (b'{"v": 1, "cmd": "echo", "args": null}\n', '"args" must be an object, got null'),
            (b'{"cmd": "echo"}\n', 'no "v"'),
            (b'{"v": 1, "cmd": "echo\xff"}\n', "not UTF-8"),
            (b'{"v": 1, "cmd": "echo", "args": {"x": NaN}}\n', "NaN is not valid JSON"),
            (b"[" * 100_000 + b"\n", "nested too deeply"),
        ],
    )
    async def test_bad_request(self, sock: Path, line: bytes, fragment: str) -> None:
        async with served(sock, max_line=200_000):
            bad, good = await exchange(sock, line + encode_request("echo"), replies=2)
            code, message = error_of(bad)
            assert code == "bad_request"
            assert fragment in message
            assert good["data"] == {"cmd": "echo", "args": {}}

    async def test_handler_result_that_is_not_json_is_internal(self, sock: Path) -> None:
        async def odd(cmd: str, args: dict[str, Any]) -> Any:
            return {"when": object()} if cmd == "object" else float("nan")

        async with served(sock, odd):
            with capture_logs() as logs:
                for cmd in ("object", "nan"):
                    with pytest.raises(ControlError) as info:
                        await call(sock, cmd)
                    assert info.value.code == ErrorCode.INTERNAL
            assert [e["cmd"] for e in logs if e["event"] == "control_handler_failed"] == [
                "object",
                "nan",
            ]

    async def test_client_that_went_away_is_harmless(self, sock: Path) -> None:
        async with served(sock) as server:
            with capture_logs() as logs:
                _, writer = await asyncio.open_unix_connection(str(sock))
                writer.write(encode_request("sleep", {"seconds": 0.2}))
                await writer.drain()
                await eventually(lambda: server.clients == 1)
                writer.close()  # gone before the reply is written
                await eventually(lambda: server.clients == 0)
            assert not [e for e in logs if e["log_level"] in ("error", "critical")]
            assert await call(sock, "echo") == {"cmd": "echo", "args": {}}

    async def test_request_without_final_newline_then_eof(self, sock: Path) -> None:
        async with served(sock):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(b'{"v": 1, "cmd": "echo"}')
            writer.write_eof()
            line = await asyncio.wait_for(reader.readline(), 2)
            assert error_of(json.loads(line)) == (
                "bad_request",
                "the request line does not end with a newline",
            )
            writer.close()


class TestLimits:
    """Line length, idle time and the connection cap keep one client from hurting the rest."""

    async def test_endless_line_is_too_long_and_not_buffered(self, sock: Path) -> None:
        await flood(sock)

    async def test_one_mib_line_is_too_long(self, sock: Path) -> None:
        def send_mib() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(sock))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b'{"v": 1, "cmd": "echo", "args": {"x": "' + b"y" * 2**20 + b'"}}\n')
                return s.makefile("rb").readline()

        async with served(sock):
            assert error_of(json.loads(await asyncio.to_thread(send_mib)))[0] == "too_long"
            assert await call(sock, "echo") == {"cmd": "echo", "args": {}}

    @pytest.mark.parametrize(("extra", "code"), [(0, None), (1, "too_long")])
    async def test_max_line_is_the_longest_line_taken(
        self, sock: Path, extra: int, code: str | None
    ) -> None:
        base = encode_request("echo", {"pad": ""})[:-1]
        line = encode_request("echo", {"pad": "p" * (200 - len(base) + extra)})
        assert len(line) - 1 == 200 + extra  # the newline does not count
        async with served(sock, max_line=200):
            (reply,) = await exchange(sock, line)
            if code is None:
                assert reply["ok"] is True
            else:
                assert error_of(reply)[0] == code

    async def test_idle_client_gets_timeout_and_is_closed(self, sock: Path) -> None:
        await idle_timeout(sock)

    async def test_clock_restarts_after_each_reply(self, sock: Path) -> None:
        async with served(sock, read_timeout=0.5):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            try:
                for i in range(3):  # 3 x 0.2 s > read_timeout, but each is in time
                    await asyncio.sleep(0.2)
                    writer.write(encode_request("echo", {"i": i}))
                    reply = json.loads(await asyncio.wait_for(reader.readline(), 2))
                    assert reply["data"]["args"] == {"i": i}
            finally:
                writer.close()

    async def test_client_that_never_reads_replies_is_dropped(self, sock: Path) -> None:
        await never_reads(sock)

    async def test_excess_clients_are_busy_and_the_loop_keeps_serving(self, sock: Path) -> None:
        await busy(sock)


class TestSocketFile:
    """Creating, replacing and removing the socket file safely."""

    async def test_parent_dir_and_socket_modes(self, sock: Path) -> None:
        async with served(sock):
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
            st = os.lstat(sock)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.geteuid()
            assert os.listdir(sock.parent) == ["control.sock"], "no temporary name left behind"

    async def test_modes_with_a_group(self, sock: Path) -> None:
        group = grp.getgrgid(os.getegid())
        async with served(sock, group=group.gr_name):
            dst = sock.parent.stat()
            assert (stat.S_IMODE(dst.st_mode), dst.st_gid) == (0o750, group.gr_gid)
            st = os.lstat(sock)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, group.gr_gid)

    async def test_existing_dir_keeps_its_mode(self, sock: Path) -> None:
        sock.parent.mkdir()
        os.chmod(sock.parent, 0o711)
        async with served(sock):
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o711

    async def test_unknown_group_is_a_clear_error(self, sock: Path) -> None:
        server = ControlServer(sock, handle, group="no-such-group-taskd")
        with pytest.raises(ControlSocketError, match="create the group or remove control_group"):
            await server.start()

    async def test_stale_socket_is_replaced(self, sock: Path) -> None:
        sock.parent.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
            old.bind(str(sock))  # closed without unlink: what a kill -9 leaves
        stale_ino = os.lstat(sock).st_ino
        with pytest.raises(NoDaemon, match="is stale"):
            request(sock, "echo")
        async with served(sock):
            assert os.lstat(sock).st_ino != stale_ino
            assert await call(sock, "echo") == {"cmd": "echo", "args": {}}

    async def test_live_socket_is_not_stolen(self, sock: Path) -> None:
        async with served(sock):
            ino = os.lstat(sock).st_ino
            second = ControlServer(sock, handle)
            with pytest.raises(SocketInUseError) as info:
                await second.start()
            assert isinstance(info.value, StateError)
            assert f"another taskd is serving on {sock}" in str(info.value)
            assert "another" in str(info.value).rsplit(";", 1)[1]  # ...: give this one another
            assert "runtime_dir" in str(info.value)
            assert os.lstat(sock).st_ino == ino
            assert os.listdir(sock.parent) == ["control.sock"]
            assert await call(sock, "echo") == {"cmd": "echo", "args": {}}
            await second.close()  # never started: a no-op that must not unlink the live one
            assert os.lstat(sock).st_ino == ino

    @pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
    async def test_not_a_socket_is_refused_and_kept(self, sock: Path, kind: str) -> None:
        what = put_obstacle(sock, kind)
        server = ControlServer(sock, handle)
        with pytest.raises(ControlSocketError, match="is not a socket; taskd will not remove it"):
            await server.start()
        assert describe(sock) == what
        assert sorted(os.listdir(sock.parent)) == ["control.sock"]

    async def test_path_too_long(self, tmp_path: Path) -> None:
        server = ControlServer(tmp_path / ("d" * 120) / "control.sock", handle)
        with pytest.raises(ControlSocketError, match=r"choose a shorter daemon\.runtime_dir"):
            await server.start()

    async def test_close_removes_our_socket_only(self, sock: Path) -> None:
        server = ControlServer(sock, handle)
        await server.start()
        await server.close()
        assert not exists(sock)
        with pytest.raises(NoDaemon, match=f"no control socket at {sock}"):
            request(sock, "echo")

        # A newer daemon replaced the path while we ran: its socket survives our close.
        server = ControlServer(sock, handle)
        await server.start()
        async with served(sock.with_name("new.sock")):
            os.rename(sock.with_name("new.sock"), sock)
            await server.close()
            assert stat.S_ISSOCK(os.lstat(sock).st_mode)
            assert await call(sock, "echo") == {"cmd": "echo", "args": {}}

    async def test_close_cancels_only_its_own_work(self, sock: Path) -> None:
        await close_cancels_running_handler(sock)

    async def test_handler_may_close_the_server(self, sock: Path) -> None:
        servers: list[ControlServer] = []

        async def stop(cmd: str, args: dict[str, Any]) -> Any:
            await servers[0].close()
            return "stopping"

        server = ControlServer(sock, stop)
        servers.append(server)
        await server.start()
        assert await call(sock, "stop") == "stopping"
        assert not server.serving
        assert not exists(sock)
        await server.close()  # from outside a handler: waits for the last connection
        assert server.clients == 0


class TestClient:
    """What the command line sees when there is no daemon or the reply is odd."""

    def test_missing_socket(self, sock: Path) -> None:
        with pytest.raises(NoDaemon) as info:
            request(sock, "status")
        assert str(info.value) == f"no taskd is running (no control socket at {sock})"
        assert info.value.path == sock

    def test_stale_socket(self, sock: Path) -> None:
        sock.parent.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(sock))
        with pytest.raises(NoDaemon, match=rf"no taskd is running \({sock} is stale"):
            request(sock, "status")

    def test_not_a_socket(self, sock: Path) -> None:
        sock.parent.mkdir()
        sock.write_text("")
        with pytest.raises(NoDaemon, match=rf"\({sock} is not a socket; check the --socket path"):
            request(sock, "status")

    def test_full_backlog_is_busy(self, sock: Path) -> None:
        sock.parent.mkdir()
        with contextlib.ExitStack() as stack:
            listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            listener.bind(str(sock))
            listener.listen(0)  # and never accept
            for _ in range(3):
                waiting = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                waiting.setblocking(False)
                waiting.connect_ex(str(sock))
            with pytest.raises(ControlError) as info:
                request(sock, "status", timeout=1)
            assert info.value.code == ErrorCode.BUSY
            assert "too many connections waiting; try again" in info.value.message

    @pytest.mark.parametrize(
        ("line", "code", "fragment"),
        [
            (b'{"v": 1, "ok": true, "data": [1]}\n', None, None),
            (b'{"v": 1, "ok": true}\n', None, None),
            (b"garbage\n", "bad_request", "not valid control protocol"),
            (b'{"v": 1, "ok": "yes"}\n', "bad_request", '"ok" must be true or false'),
            (b'{"v": 1, "ok": false}\n', "bad_request", "an error reply needs"),
            (b'{"v": 2, "ok": true}\n', "version", "this taskd command speaks version 1"),
            (b'{"v":1,"ok":false,"error":{"code":"new_code","message":"m"}}\n', "new_code", "m"),
        ],
    )
    def test_decode_reply(self, line: bytes, code: str | None, fragment: str | None) -> None:
        if code is None:
            assert decode_reply(line) == json.loads(line).get("data")
            return
        with pytest.raises(ControlError) as info:
            decode_reply(line)
        assert info.value.code == code
        assert fragment is not None and fragment in info.value.message

    def test_encode_decode_request(self) -> None:
        line = encode_request("trigger", {"job": "x", "wait": True})
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode_request(line) == ("trigger", {"job": "x", "wait": True})

    async def test_reply_timeout(self, sock: Path) -> None:
        async with served(sock):
            with pytest.raises(ControlError) as info:
                await call(sock, "sleep", {"seconds": 1}, timeout=0.2)
            assert info.value.code == ErrorCode.TIMEOUT
            assert "no reply from taskd within 0.2 s" in info.value.message

    async def test_no_timeout_waits(self, sock: Path) -> None:
        async with served(sock):
            assert await call(sock, "sleep", {"seconds": 0.3}, timeout=None) == "slept"


# -- other users ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int  # the user's own primary group
    group: str  # a group the user is a supplementary member of
    group_gid: int


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def peer() -> Iterator[Peer]:
    """A throwaway system user (and a group it is a member of) to connect as another uid."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a throwaway user to connect to the socket as another uid")
    if shutil.which("useradd") is None or shutil.which("groupadd") is None:
        pytest.skip("needs useradd and groupadd (package passwd) to create a throwaway user")
    made_user = made_group = False
    try:
        try:
            pwd.getpwnam(PEER_USER)
        except KeyError:
            _run(
                "useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PEER_USER
            )
            made_user = True
        try:
            grp.getgrnam(PEER_GROUP)
        except KeyError:
            _run("groupadd", "--system", PEER_GROUP)
            made_group = True
        if PEER_USER not in grp.getgrnam(PEER_GROUP).gr_mem:
            _run("usermod", "-aG", PEER_GROUP, PEER_USER)
        user = pwd.getpwnam(PEER_USER)
        group = grp.getgrnam(PEER_GROUP)
        yield Peer(user.pw_uid, user.pw_gid, PEER_GROUP, group.gr_gid)
    finally:
        if made_user:
            _run("userdel", PEER_USER)
        if made_group:
            _run("groupdel", PEER_GROUP)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can enter (pytest's tmp_path is 0700 to root)."""
    path = Path(tempfile.mkdtemp(prefix="taskd-ctl-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("ERR", exc.errno)
    raise SystemExit
try:
    s.sendall(b'{"v": 1, "cmd": "echo"}\\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # a refused peer may be answered and closed before it writes
print(s.makefile("rb").readline().decode().strip())
"""


# The taskd client as the command line uses it. The venv's python lives under /root, out of
# the peer's reach, so the system python of the same version imports from the venv's path.
CLIENT = f"""
import sys
sys.path[:0] = {[str(Path(__file__).parents[2]), *(p for p in sys.path if "site-packages" in p)]!r}
from taskd.control.client import request
from taskd.control.protocol import ControlError
try:
    print("data", request(sys.argv[1], "echo"))
except ControlError as exc:
    print(exc.code, exc.message)
"""


async def connect_as(
    peer: Peer,
    path: Path,
    *,
    gid: int | None = None,
    extra_groups: list[int] | None = None,
    code: str = CONNECT,
) -> str:
    """Connect from a child process running as the peer's uid; its reply line or "ERR n"."""
    proc = await asyncio.to_thread(
        subprocess.run,
        ["/usr/bin/python3", "-I", "-c", code, str(path)],
        user=peer.uid,
        group=peer.gid if gid is None else gid,
        extra_groups=extra_groups or [],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


async def other_uid_is_forbidden(peer: Peer, open_dir: Path) -> None:
    path = open_dir / "run" / "control.sock"
    async with served(path) as server:
        # Open the file system's door wide: only the peer check stands in the way.
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o666)
        with capture_logs() as logs:
            reply = json.loads(await connect_as(peer, path))
        code, message = error_of(reply)
        assert code == "forbidden"
        assert message.startswith(f"uid {peer.uid} may not use the control socket; allowed: root")
        assert "control_group" in message
        (event,) = [e for e in logs if e["event"] == "control_forbidden"]
        assert event["uid"] == peer.uid
        await eventually(lambda: server.clients == 0)
        assert await call(path, "echo") == {"cmd": "echo", "args": {}}


class TestPeers:
    """SO_PEERCRED decides; the file mode is only the first gate."""

    async def test_other_uid_is_forbidden(self, peer: Peer, open_dir: Path) -> None:
        await other_uid_is_forbidden(peer, open_dir)

    async def test_forbidden_message_names_the_group(self, peer: Peer, open_dir: Path) -> None:
        path = open_dir / "run" / "control.sock"
        async with served(path, group=peer.group):
            os.chmod(path, 0o666)
            os.chmod(path.parent, 0o755)
            code, message = error_of(json.loads(await connect_as(peer, path)))
            assert code == "forbidden"
            assert f"members of group {peer.group!r}" in message

    async def test_supplementary_group_member_is_allowed(self, peer: Peer, open_dir: Path) -> None:
        path = open_dir / "run" / "control.sock"
        async with served(path, group=peer.group):
            # No chmod: the real 0750 directory and 0660 socket let the group in.
            reply = json.loads(await connect_as(peer, path, extra_groups=[peer.group_gid]))
            assert reply == {"v": 1, "ok": True, "data": {"cmd": "echo", "args": {}}}

    async def test_primary_group_member_is_allowed(self, peer: Peer, open_dir: Path) -> None:
        path = open_dir / "run" / "control.sock"
        async with served(path, group=peer.group):
            reply = json.loads(await connect_as(peer, path, gid=peer.group_gid))
            assert reply["ok"] is True

    async def test_non_member_cannot_even_open_the_socket(self, peer: Peer, open_dir: Path) -> None:
        path = open_dir / "run" / "control.sock"
        async with served(path, group=peer.group):
            os.chmod(path.parent, 0o755)  # the 0660 socket alone keeps the stranger out
            assert await connect_as(peer, path) == f"ERR {errno.EACCES}"

    async def test_client_reports_a_refusal(self, peer: Peer, open_dir: Path) -> None:
        path = open_dir / "run" / "control.sock"
        async with served(path):
            os.chmod(path.parent, 0o755)
            os.chmod(path, 0o666)
            out = await connect_as(peer, path, code=CLIENT)
            assert out.startswith(f"forbidden uid {peer.uid} may not use the control socket")

    async def test_client_reports_permission_denied(self, peer: Peer, open_dir: Path) -> None:
        path = open_dir / "run" / "control.sock"
        async with served(path):
            os.chmod(path.parent, 0o755)  # the 0600 socket is the gate
            out = await connect_as(peer, path, code=CLIENT)
            assert out == (
                f"forbidden cannot open {path}: permission denied; run as root, the daemon's "
                "user or a member of control_group"
            )

    def test_group_database_when_proc_cannot_tell(self, peer: Peer) -> None:
        # pid 0: the peer is in a pid namespace we cannot see; the group list says yes/no.
        assert allowed(0, peer.uid, peer.gid, peer.group_gid)
        assert not allowed(0, peer.uid, peer.gid, 0)
        assert not allowed(0, peer.uid, peer.gid, None)
        assert allowed(0, 0, 0, None), "root always may"
        assert allowed(0, os.geteuid(), 12345, None), "the daemon's own user always may"


class TestOnUvloop:
    """The daemon runs on uvloop: the same scenarios on its loop (its StreamReader limits, its
    transports, SO_PEERCRED through its PseudoSocket)."""

    @pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
    def test_scenario(
        self, sock: Path, scenario: Callable[[Path], Coroutine[Any, Any, None]]
    ) -> None:
        on_uvloop(scenario(sock))

    def test_other_uid_is_forbidden(self, peer: Peer, open_dir: Path) -> None:
        on_uvloop(other_uid_is_forbidden(peer, open_dir))


class TestHangup:
    """A client that hangs up while its request is handled frees its slot at once."""

    async def test_gone_client_frees_its_slot(self, sock: Path) -> None:
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def forever(cmd: str, args: dict[str, Any]) -> Any:
            started.set()
            try:
                await asyncio.sleep(3600)  # a `trigger --wait` of a long run
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async with served(sock, forever, max_clients=1) as server:
            _reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(encode_request("trigger", {"job": "long", "wait": True}))
            await writer.drain()
            await asyncio.wait_for(started.wait(), 2)
            writer.close()  # Ctrl-C in the client
            await asyncio.wait_for(cancelled.wait(), 3)
            await eventually(lambda: server.clients == 0, within=2)
            # The one slot is free again: a new client is served, not turned away busy.
            started.clear()
            _reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(encode_request("x"))
            await writer.drain()
            await asyncio.wait_for(started.wait(), 2)
            writer.close()


def test_a_lone_surrogate_crosses_the_socket() -> None:
    """A reply holding a lone surrogate (a job's error) is valid JSON, and reads back the
    same; strict UTF-8 encoding failed the whole reply with UnicodeEncodeError."""
    from taskd.control.protocol import encode_ok

    line = encode_ok({"error": "x\ud800", "\udc80": 1})
    assert line.decode("utf-8")  # strict: it is UTF-8
    assert decode_reply(line) == {"error": "x\ud800", "\udc80": 1}
