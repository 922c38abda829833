"""The control socket: the protocol, the daemon's server, and the command line's client."""

from taskd.control.client import NoDaemon, request
from taskd.control.peer import allowed, peer_credentials
from taskd.control.protocol import PROTOCOL_VERSION, SOCKET_NAME, ControlError, ErrorCode
from taskd.control.server import ControlServer
from taskd.control.socketfile import ControlSocketError, SocketInUseError

__all__ = [
    "PROTOCOL_VERSION",
    "SOCKET_NAME",
    "ControlError",
    "ControlServer",
    "ControlSocketError",
    "ErrorCode",
    "NoDaemon",
    "SocketInUseError",
    "allowed",
    "peer_credentials",
    "request",
]
