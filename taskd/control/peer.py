"""Who is on the other end of the control socket, and may they use it.

The socket's file mode already keeps strangers out; this check is the second gate, and the
only one when a directory or socket mode was loosened by hand."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from typing import Protocol

_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid


class _SockOpt(Protocol):
    """A socket, or what asyncio and uvloop hand out for one (TransportSocket, PseudoSocket)."""

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_credentials(sock: _SockOpt) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process that connected ``sock``, as the kernel recorded them
    at connect time (SO_PEERCRED): they cannot be forged by the peer."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


def _proc_groups(pid: int) -> set[int] | None:
    """The supplementary groups of ``pid`` from /proc, or None when they cannot be read (the
    process is gone, /proc is not mounted, or the peer is in a pid namespace we cannot see,
    where the kernel reports pid 0)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        return None
    return None


def _database_groups(uid: int, group_gid: int) -> bool:
    """Whether the user ``uid`` is listed as a member of ``group_gid`` in the group database.

    A fallback only: it says what the user would get at login, not what the process has."""
    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(group_gid)
    except KeyError:
        return False
    return user.pw_gid == group_gid or user.pw_name in group.gr_mem


def allowed(pid: int, uid: int, gid: int, group_gid: int | None) -> bool:
    """May this peer use the control socket? Root and the daemon's own user always may; with a
    control group, so may a process whose primary or supplementary groups include it."""
    if uid == 0 or uid == os.geteuid():
        return True
    if group_gid is None:
        return False
    if gid == group_gid:
        return True
    groups = _proc_groups(pid)
    if groups is None:
        return _database_groups(uid, group_gid)
    return group_gid in groups


def who_may_connect(group: str | None) -> str:
    """For a refusal: "root, uid 998 (the daemon's user), members of group 'taskd'"."""
    euid = os.geteuid()
    parts = ["root"]
    if euid != 0:
        try:
            name = f"{pwd.getpwuid(euid).pw_name}, "
        except KeyError:
            name = ""
        parts.append(f"uid {euid} ({name}the daemon's user)")
    else:
        parts[0] = "root (the daemon's user)"
    if group is not None:
        parts.append(f"members of group {group!r}")
    return ", ".join(parts)
