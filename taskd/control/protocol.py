"""The control protocol: what the ``taskd`` command and the daemon say to each other.

Transport: a UNIX stream socket (``<runtime_dir>/control.sock`` by convention), mode 0600, or
0660 owned by ``daemon.control_group``; the daemon also checks each peer's credentials
(SO_PEERCRED), so the file mode is not the only gate.

Framing: one JSON object per line each way, UTF-8, terminated by ``"\\n"``. A request line may
be at most 64 KiB (the server's ``max_line``); a longer one is answered ``too_long`` and the
connection closed. Several requests may be sent one after another on one connection; the
replies come in the same order, one per request.

Request::

    {"v": 1, "cmd": "<name>", "args": {...}}        # "args" is optional and must be an object

Reply::

    {"v": 1, "ok": true, "data": <any JSON>}
    {"v": 1, "ok": false, "error": {"code": "<code>", "message": "<what, and what to do>"}}

``code`` is one of :class:`ErrorCode`; ``message`` is for a human and never a traceback.

The server closes the connection after a ``forbidden``, ``busy``, ``too_long`` or ``timeout``
reply (each request must arrive within the server's ``read_timeout`` of the previous reply or
of connecting), and when the daemon stops (``stopping``). Any other error leaves the
connection usable.

A request whose ``"v"`` is not :data:`PROTOCOL_VERSION` is answered ``version`` (a reply in
this same version-1 shape), so an old command talking to a new daemon says so plainly.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from taskd.errors import TaskdError

PROTOCOL_VERSION = 1
SOCKET_NAME = "control.sock"  # the socket's file name inside runtime_dir


class ErrorCode(StrEnum):
    """The ``error.code`` of a reply: what a client may branch on."""

    BAD_REQUEST = "bad_request"  # not a valid request (or, in a client, not a valid reply)
    UNKNOWN_COMMAND = "unknown_command"
    VERSION = "version"  # the peer speaks another protocol version
    FORBIDDEN = "forbidden"  # this user may not use the control socket
    BUSY = "busy"  # too many connections at once
    TOO_LONG = "too_long"  # a request line over the server's max_line
    TIMEOUT = "timeout"  # no request in time (server), or no reply in time (client)
    REFUSED = "refused"  # understood, but not done (an invalid config on reload, ...)
    NOT_FOUND = "not_found"  # no such job (or other named thing)
    STOPPING = "stopping"  # the daemon stopped while the request was in progress
    INTERNAL = "internal"  # a bug in the daemon; details are in its log


class ControlError(TaskdError):
    """An error reply. A command handler raises it to refuse a request with a clear message;
    the client raises it when the daemon's reply is an error (or not a reply at all)."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        # An unknown code (a newer daemon) is kept as the plain string it was.
        try:
            self.code: str = ErrorCode(code)
        except ValueError:
            self.code = str(code)
        self.message = message

    def __repr__(self) -> str:
        return f"ControlError({str(self.code)!r}, {self.message!r})"


def _dumps(obj: Any) -> bytes:
    # allow_nan=False: NaN and Infinity are not JSON, and other clients would choke on them.
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # A lone surrogate (a job's error or result holding one) cannot be UTF-8: as the JSON
    # escape it comes out as here (it is always inside a string), the reply stays valid JSON
    # and the client reads the same str back. Strict encoding failed the whole reply.
    return text.encode("utf-8", "backslashreplace") + b"\n"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(line: bytes) -> Any:
    """Strict JSON from one line: UTF-8, no NaN/Infinity. Raises ValueError with a short reason."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _check_version(obj: dict[str, Any], what: str, me: str) -> None:
    if "v" not in obj:
        raise ControlError(ErrorCode.BAD_REQUEST, f'{what} has no "v" (protocol version)')
    v = obj["v"]
    if type(v) is not int or v != PROTOCOL_VERSION:  # type(): True == 1 must not pass
        raise ControlError(
            ErrorCode.VERSION,
            f"{what} uses control protocol version {json.dumps(v)}; {me} speaks version "
            f"{PROTOCOL_VERSION}: use a taskd command of the same version as the daemon",
        )


def encode_request(cmd: str, args: dict[str, Any] | None = None) -> bytes:
    """One request line, newline included."""
    request: dict[str, Any] = {"v": PROTOCOL_VERSION, "cmd": cmd}
    if args:
        request["args"] = args
    return _dumps(request)


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """``(cmd, args)`` from one request line (trailing newline allowed).

    Raises ControlError ``bad_request`` for anything that is not a request, ``version`` for a
    request in another protocol version."""
    try:
        obj = _loads(line)
    except ValueError as exc:
        raise ControlError(ErrorCode.BAD_REQUEST, f"bad request line: {exc}") from None
    if not isinstance(obj, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, f"a request is a JSON object, got {_type(obj)}")
    _check_version(obj, "the request", "this daemon")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        got = "an empty string" if cmd == "" else _type(cmd)
        problem = "is missing" if cmd is None else f"must be a non-empty string, got {got}"
        raise ControlError(ErrorCode.BAD_REQUEST, f'the request\'s "cmd" {problem}')
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ControlError(
            ErrorCode.BAD_REQUEST, f'the request\'s "args" must be an object, got {_type(args)}'
        )
    return cmd, args


def encode_ok(data: Any) -> bytes:
    """A success reply line. Raises ValueError or TypeError if ``data`` is not JSON-able."""
    return _dumps({"v": PROTOCOL_VERSION, "ok": True, "data": data})


def encode_error(code: ErrorCode | str, message: str) -> bytes:
    """An error reply line."""
    return _dumps(
        {"v": PROTOCOL_VERSION, "ok": False, "error": {"code": str(code), "message": message}}
    )


def decode_reply(line: bytes) -> Any:
    """The ``data`` of a success reply; raises ControlError for an error reply, and
    ControlError ``bad_request`` (or ``version``) when the line is not a valid reply."""

    def invalid(problem: str) -> ControlError:
        return ControlError(
            ErrorCode.BAD_REQUEST, f"the daemon's reply is not valid control protocol: {problem}"
        )

    try:
        obj = _loads(line)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if not isinstance(obj, dict):
        raise invalid(f"a reply is a JSON object, got {_type(obj)}")
    try:
        _check_version(obj, "the daemon's reply", "this taskd command")
    except ControlError as exc:
        if exc.code == ErrorCode.BAD_REQUEST:
            raise invalid('no "v" (protocol version)') from None
        raise
    ok = obj.get("ok")
    if ok is True:
        return obj.get("data")
    if ok is not False:
        raise invalid(f'"ok" must be true or false, got {_type(ok)}')
    error = obj.get("error")
    if (
        not isinstance(error, dict)
        or not isinstance(error.get("code"), str)
        or not isinstance(error.get("message"), str)
    ):
        raise invalid('an error reply needs "error": {"code": "...", "message": "..."}')
    raise ControlError(error["code"], error["message"])
