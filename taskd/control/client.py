"""The command line's end of the control socket: one blocking request, one reply.

No asyncio here: the ``taskd`` command sends one request and exits, and should not pay for
starting an event loop to do it."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Any

from taskd.control.protocol import ControlError, ErrorCode, decode_reply, encode_request
from taskd.errors import TaskdError

MAX_REPLY = 64 * 1024 * 1024  # a reply (a long history) may be big, but not unbounded


class NoDaemon(TaskdError, ConnectionError):
    """No daemon answers on the control socket: it is missing, or stale (left by a daemon
    that was killed). The command line exits 3 on it."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _connect(path: Path, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise NoDaemon(f"no taskd is running (no control socket at {path})", path=path) from None
    except ConnectionRefusedError:
        sock.close()
        if not _is_socket(path):  # Linux refuses a connect to a plain file the same way
            raise NoDaemon(
                f"no taskd is running ({path} is not a socket; check the --socket path)",
                path=path,
            ) from None
        raise NoDaemon(
            f"no taskd is running ({path} is stale: nothing listens on it; a new daemon "
            "replaces it)",
            path=path,
        ) from None
    except PermissionError:
        sock.close()
        raise ControlError(
            ErrorCode.FORBIDDEN,
            f"cannot open {path}: permission denied; run as root, the daemon's user or a "
            "member of control_group",
        ) from None
    except TimeoutError:
        sock.close()
        raise ControlError(
            ErrorCode.TIMEOUT,
            f"taskd did not accept a connection on {path} within {timeout:g} s; it may be "
            "overloaded or stuck (see its log)",
        ) from None
    except BlockingIOError:
        # With a timeout the socket is non-blocking inside, and a full listen backlog on a
        # UNIX socket gives EAGAIN at once instead of waiting.
        sock.close()
        raise ControlError(
            ErrorCode.BUSY,
            f"taskd's control socket {path} has too many connections waiting; try again",
        ) from None
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
            raise NoDaemon(
                f"no taskd is running ({path} is not a control socket: {exc.strerror})",
                path=path,
            ) from None
        raise ControlError(
            ErrorCode.INTERNAL, f"cannot connect to {path}: {exc.strerror or exc}"
        ) from None
    return sock


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_line(sock: socket.socket, path: Path, timeout: float | None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise ControlError(
                ErrorCode.TIMEOUT,
                f"no reply from taskd within {timeout:g} s ({path}); it may be busy: try "
                "again, or see its log",
            ) from None
        except ConnectionResetError:
            chunk = b""  # the daemon closed with our request unread: same as no reply
        if not chunk:
            raise ControlError(
                ErrorCode.STOPPING,
                f"taskd closed the connection on {path} without a reply; is it stopping?",
            )
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[: newline + 1])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY:
            raise ControlError(
                ErrorCode.BAD_REQUEST, f"the reply from taskd is over {MAX_REPLY} bytes"
            )


def request(
    path: Path,
    cmd: str,
    args: dict[str, Any] | None = None,
    *,
    timeout: float | None = 30.0,
) -> Any:
    """Send ``cmd`` to the daemon listening on ``path``; return the reply's data.

    ``timeout`` bounds the connect and each wait for reply bytes; None waits for ever (a
    ``trigger --wait`` or a ``reload`` takes as long as it takes).

    Raises NoDaemon when no daemon is running, and ControlError for an error reply, a refused
    connection (``forbidden``), no reply in time (``timeout``), a connection closed without a
    reply (``stopping``) or a reply that is not protocol (``bad_request``)."""
    line = encode_request(cmd, args)
    sock = _connect(path, timeout)
    with sock:
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon may have answered and closed at once (forbidden, busy): read that.
            pass
        except TimeoutError:
            raise ControlError(
                ErrorCode.TIMEOUT, f"taskd did not read the request within {timeout:g} s"
            ) from None
        return decode_reply(_read_line(sock, path, timeout))
