"""Whether a file or folder may be trusted by the daemon: sshd's StrictModes, for taskd.

The daemon runs code from plugin folders, takes orders from its config file and writes its
state under ``state_dir``, often as root. Anyone who can change one of these (or swap it,
through a folder on its path) can run code as the daemon's user. So each is checked before
use, on its real path (symlinks resolved):

- the object itself is owned by root or by the daemon's effective user, and is not
  writable by group or others;
- every folder above it is owned by root or the daemon's user, and is not writable by group
  or others, unless it is sticky (``/tmp``): in a sticky folder only an entry's owner may
  rename or remove it, and the entry below is checked in turn.

Group-writable is refused even where the group holds only the owner: taskd cannot know who
will be added to it later. Each refusal is one sentence naming the path, what is wrong and
the command that fixes it (``chmod go-w PATH``, ``chown USER PATH``).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

__all__ = ["TrustChecker", "owner_problem", "user_name"]


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def owner_problem(what: str, path: str | Path, st: os.stat_result, euid: int) -> str | None:
    """Why ``st`` (of ``path``, called ``what``) is not safe for a daemon running as ``euid``:
    owned by another non-root user, or writable by group or others. None when it is safe."""
    me = user_name(euid)
    if st.st_uid not in (0, euid):
        allowed = "root (taskd runs as root)" if euid == 0 else f"root or {me} (taskd runs as {me})"
        return (
            f"{what} {path} is owned by {user_name(st.st_uid)}, not by {allowed}, so that "
            f"user could change what taskd does: chown {me} {path}"
        )
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable:
        who = (
            "others"
            if writable == stat.S_IWOTH
            else f"group {_group_name(st.st_gid)}"
            + (" and others" if writable & stat.S_IWOTH else "")
        )
        return (
            f"{what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), so they "
            f"could change what taskd does: chmod go-w {path}"
        )
    return None


class TrustChecker:
    """Checks paths for one daemon user; remembers the verdict on each folder it walked, so a
    folder of many plugin files costs one walk up to ``/``."""

    def __init__(self, euid: int | None = None) -> None:
        self.euid = os.geteuid() if euid is None else euid
        self._dirs: dict[str, str | None] = {}

    def parents_problem(self, real: str) -> str | None:
        """Why a folder above ``real`` (a resolved, absolute path) makes it unsafe, or None."""
        parent = os.path.dirname(real)
        if parent == real:  # "/"
            return None
        if parent in self._dirs:
            return self._dirs[parent]
        problem = self.parents_problem(parent)
        if problem is None:
            try:
                st = os.lstat(parent)
            except OSError as exc:
                problem = f"cannot check folder {parent}: {exc.strerror or exc}"
            else:
                if not stat.S_ISDIR(st.st_mode):  # swapped for a link since realpath
                    problem = f"{parent} changed while it was checked; try again"
                elif st.st_uid in (0, self.euid) and st.st_mode & stat.S_ISVTX:
                    problem = None  # sticky (/tmp): only an entry's owner may move it
                else:
                    problem = owner_problem("folder", parent, st, self.euid)
        self._dirs[parent] = problem
        return problem

    def path_problem(self, path: Path, what: str, *, folder: bool = False) -> str | None:
        """Why ``path`` (followed through symlinks) is not safe to trust, or None.

        ``what`` names it in the message ("plugin file", "config file", "state_dir").
        Raises FileNotFoundError when it does not exist."""
        real = os.path.realpath(path)
        st = os.stat(real)
        shown = str(path) if real == str(path) else f"{path} (a symlink to {real})"
        if folder and not stat.S_ISDIR(st.st_mode):
            return f"{what} {shown} is not a folder"
        problem = owner_problem(what, real, st, self.euid)
        if problem is not None:
            return problem if real == str(path) else f"{problem} (reached through {path})"
        parents = self.parents_problem(real)
        if parents is not None:
            return f"{what} {shown} cannot be trusted: {parents}"
        return None
