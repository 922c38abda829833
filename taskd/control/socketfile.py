"""The control socket's file: its folder, a stale socket's replacement, the bind at its final
mode. What the ControlServer (taskd.control.server) needs before it accepts anyone."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import secrets
import socket
import stat
from pathlib import Path

import structlog

from taskd.errors import StateError

log = structlog.get_logger("taskd.control")

# sun_path is 108 bytes with the terminating NUL; the kernel refuses longer paths.
MAX_SOCKET_PATH = 107
BACKLOG = 128


class ControlSocketError(StateError):
    """The control socket cannot be created at its path (see the message for what to do)."""


class SocketInUseError(ControlSocketError):
    """A live daemon already listens on the control socket path."""


def lookup_group(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSocketError(
            f"control_group {group!r} does not exist on this host; create the group "
            "or remove control_group"
        ) from None


def make_parent(path: Path, group: str | None, gid: int | None) -> None:
    parent = path.parent
    if parent.is_dir():
        _warn_if_unreachable(parent, group, gid)
        return  # an existing directory is the admin's (or systemd's): never re-mode it
    mode = 0o700 if gid is None else 0o750
    try:
        parent.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(parent, mode)
        except FileExistsError:
            if parent.is_dir():  # made by someone else meanwhile: theirs, leave it
                return
            raise
        os.chmod(parent, mode)  # mkdir's mode is cut by the umask
        if gid is not None:
            os.chown(parent, -1, gid)
    except OSError as exc:
        raise ControlSocketError(
            f"cannot create the control socket's directory {parent}: "
            f"{exc.strerror or exc}; create it or choose another daemon.runtime_dir"
        ) from None


def _warn_if_unreachable(parent: Path, group: str | None, gid: int | None) -> None:
    if gid is None:
        return
    try:
        st = parent.stat()
    except OSError:
        return
    group_can_enter = st.st_gid == gid and st.st_mode & stat.S_IXGRP
    if not group_can_enter and not st.st_mode & stat.S_IXOTH:
        log.warning(
            "control_dir_closed_to_group",
            path=str(parent),
            mode=oct(stat.S_IMODE(st.st_mode)),
            group=group,
            hint=f"members of {group!r} cannot reach the socket: chgrp {group} "
            f"and chmod 0750 the directory (RuntimeDirectoryMode=0750 under systemd)",
        )


def check_existing(path: Path) -> None:
    """Refuse a path that holds anything but a stale socket; a stale one is left for the
    atomic rename to replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlSocketError(
            f"cannot check the control socket path {path}: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(
            f"{path} exists and is not a socket; taskd will not remove it: move it "
            "away or choose another daemon.runtime_dir"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)  # a full backlog must not block the daemon's start
        code = probe.connect_ex(os.fsencode(path))
    finally:
        probe.close()
    if code in (errno.ECONNREFUSED, errno.ENOENT):
        log.info("control_stale_socket_replaced", path=str(path))
        return
    if code in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise SocketInUseError(
            f"another taskd is serving on {path} (its control socket answers); "
            "each daemon needs its own daemon.runtime_dir: give this one another"
        )
    raise ControlSocketError(
        f"cannot tell whether {path} belongs to a running daemon: "
        f"{os.strerror(code)}; remove it if no taskd uses it, or choose another "
        "daemon.runtime_dir"
    )


def bind(path: Path, group: str | None, gid: int | None) -> tuple[socket.socket, Path]:
    """A listening socket at a temporary name beside the path, already at its final mode:
    no client ever sees it with a looser one."""
    tmp = path.with_name(f".{secrets.token_hex(4)}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fsencode(tmp))
        try:
            if gid is None:
                os.chmod(tmp, 0o600)
            else:
                os.chown(tmp, -1, gid)
                os.chmod(tmp, 0o660)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except BaseException:
            unlink_quietly(tmp)
            raise
    except OSError as exc:
        sock.close()
        what = (
            f"give it to group {group!r} (run the daemon as root or as a member)"
            if exc.errno == errno.EPERM and gid is not None
            else f"create it in {path.parent}"
        )
        raise ControlSocketError(
            f"cannot create the control socket {path}: could not {what}: {exc.strerror or exc}"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock, tmp


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
