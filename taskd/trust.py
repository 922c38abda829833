"""Whether a file or folder may be trusted by the daemon: sshd's StrictModes, for taskd.

The daemon runs code from plugin folders, takes orders from its config file and writes its
state under ``state_dir``, often as root. Anyone who can change one of these (or swap it,
through a folder on its path) can run code as the daemon's user. So each is checked before
use, along the path as given and the path it resolves to: the path is walked one name at a
time, as the kernel would, and

- every folder a name is looked up in is owned by root or the daemon's user and is not
  writable by group or others, unless it is sticky (``/tmp``): in a sticky folder only an
  entry's owner may rename or remove it, and the entry is checked in turn;
- a symlink met on the way is as trustworthy as the folder holding it (only that folder's
  owner can repoint it; in a sticky folder, the link's owner can), and its target is walked
  the same way;
- the object it ends at is owned by root or the daemon's user and not writable by group or
  others.

Group-writable is refused even where the group holds only the owner: taskd cannot know who
will be added to it later. Each refusal is one sentence naming the path, what is wrong and
the command that fixes it (``chmod go-w PATH``, ``chown USER PATH``).

The file that is checked is the file that is read: :meth:`TrustChecker.open` opens the
resolved path (every folder on it trusted, so no one else can change what it names) with
``O_NOFOLLOW`` and compares the open file with what was checked.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Problem",
    "TrustChecker",
    "Untrusted",
    "Verdict",
    "owner_issue",
    "owner_problem",
    "user_name",
]

MAX_LINKS = 40  # the kernel's own limit on symlinks followed in one lookup
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


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


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a path is not trusted: the sentence to show, and the commands that fix it,
    each applied to ``path`` (so that a report can combine them, see taskd.trust_report)."""

    message: str
    path: str = ""
    fixes: tuple[str, ...] = ()  # "chmod go-w", "chown root", ...
    owner: int = -1  # the uid owning ``path``


def _owner_fixes(st: os.stat_result, euid: int) -> tuple[str, ...]:
    fixes = []
    if st.st_uid not in (0, euid):
        fixes.append(f"chown {user_name(euid)}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        fixes.append("chmod go-w")
    return tuple(fixes)


def owner_issue(what: str, path: str | Path, st: os.stat_result, euid: int) -> Problem | None:
    """owner_problem, with the fixes apart (for a report that combines them)."""
    fixes = _owner_fixes(st, euid)
    if not fixes:
        return None
    wrong = []
    other_owner = st.st_uid not in (0, euid)
    if other_owner:
        me = user_name(euid)
        allowed = "root (taskd runs as root)" if euid == 0 else f"root or {me} (taskd runs as {me})"
        wrong.append(f"is owned by {user_name(st.st_uid)}, not by {allowed}")
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable:
        who = (
            "others"
            if writable == stat.S_IWOTH
            else f"group {_group_name(st.st_gid)}"
            + (" and others" if writable & stat.S_IWOTH else "")
        )
        wrong.append(f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})")
    they = "that user" if other_owner and not writable else "they"
    message = (
        f"{what} {path} {' and '.join(wrong)}, so {they} could change what taskd does: "
        + " && ".join(f"{fix} {path}" for fix in fixes)
    )
    return Problem(message, str(path), fixes, st.st_uid)


def owner_problem(what: str, path: str | Path, st: os.stat_result, euid: int) -> str | None:
    """Why ``st`` (of ``path``, called ``what``) is not safe for a daemon running as ``euid``:
    owned by another non-root user, or writable by group or others. None when it is safe."""
    issue = owner_issue(what, path, st, euid)
    return None if issue is None else issue.message


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`TrustChecker.judge` found: where ``path`` leads and what is wrong on the way."""

    path: Path  # as given
    real: str  # resolved: absolute, no symlink, no ``..``
    st: os.stat_result  # of ``real``
    problems: tuple[Problem, ...]
    via_link: bool  # whether a symlink was followed to get there

    @property
    def shown(self) -> str:
        """How messages name the path: as given, and where it leads if a symlink took it
        elsewhere (a ``..`` is no symlink, and is not called one)."""
        return f"{self.path} (which resolves to {self.real})" if self.via_link else str(self.path)

    @property
    def message(self) -> str | None:
        return "; ".join(p.message for p in self.problems) or None


class Untrusted(PermissionError):
    """The path may not be used; ``problems`` says why, each with its fix."""

    def __init__(self, problems: tuple[Problem, ...]) -> None:
        super().__init__(errno.EPERM, "; ".join(p.message for p in problems))
        self.problems = problems

    def __str__(self) -> str:
        return str(self.strerror)


class TrustChecker:
    """Checks paths for one daemon user; remembers the verdict on each folder it walked, so a
    folder of many plugin files costs one walk up to ``/``."""

    def __init__(self, euid: int | None = None) -> None:
        self.euid = os.geteuid() if euid is None else euid
        self._dirs: dict[str, tuple[os.stat_result, Problem | None]] = {}

    def _folder(self, folder: str) -> tuple[os.stat_result, Problem | None]:
        """The folder's own verdict (its owner and mode; the folders above are walked too)."""
        if folder in self._dirs:
            return self._dirs[folder]
        st = os.lstat(folder)
        problem: Problem | None
        if not stat.S_ISDIR(st.st_mode):  # swapped for a link since it was looked up
            problem = Problem(f"{folder} changed while it was checked; try again", folder)
        elif st.st_uid in (0, self.euid) and st.st_mode & stat.S_ISVTX:
            problem = None  # sticky (/tmp): only an entry's owner may move it
        else:
            problem = owner_issue("folder", folder, st, self.euid)
        self._dirs[folder] = (st, problem)
        return st, problem

    def _walk(self, path: Path) -> tuple[str, os.stat_result, list[Problem], bool]:
        """Resolve ``path`` one name at a time: (real path, its lstat, the folders and links
        on the way that are not trusted, whether a symlink was followed). Raises OSError
        (FileNotFoundError, NotADirectoryError, ELOOP) as the kernel's lookup would."""
        # Not abspath(): it would drop a ".." lexically, before the folder it leaves is seen.
        todo = list(reversed(os.path.join(os.getcwd(), path).split("/")))
        real = "/"
        found: list[Problem] = []
        links = 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                # Every folder on the path as given is judged, this one too, though only the
                # folder holding it could swap it: a path through someone else's folder is
                # refused however it continues, as sshd's StrictModes would.
                _, problem = self._folder(real)
                found.extend([problem] if problem is not None else [])
                real = os.path.dirname(real)
                continue
            folder_st, problem = self._folder(real)
            found.extend([problem] if problem is not None else [])
            entry = os.path.join(real, name)
            st = os.lstat(entry)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
                if folder_st.st_mode & stat.S_ISVTX and st.st_uid not in (0, self.euid):
                    me = user_name(self.euid)
                    found.append(
                        Problem(
                            f"symlink {entry} in the shared (sticky) folder {real} belongs to "
                            f"{user_name(st.st_uid)}, who could point it elsewhere: "
                            f"chown -h {me} {entry}",
                            entry,
                            (f"chown -h {me}",),
                            st.st_uid,
                        )
                    )
                target = os.readlink(entry)
                if target.startswith("/"):
                    real = "/"
                todo.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode) and any(n not in ("", ".") for n in todo):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), entry)
            real = entry
        return real, os.lstat(real), found, links > 0

    def judge(self, path: Path, what: str, *, folder: bool = False) -> Verdict:
        """Everything that makes ``path`` unsafe to trust, along the path as given and the
        one it resolves to. ``what`` names it in messages ("plugin file", "config file",
        "state_dir"). Raises OSError (FileNotFoundError when it does not exist)."""
        real, st, found, via_link = self._walk(path)
        shown = Verdict(Path(path), real, st, (), via_link).shown
        problems = _framed(what, shown, found)
        if folder and not stat.S_ISDIR(st.st_mode):
            problems.append(Problem(f"{what} {shown} is not a folder"))
        own = owner_issue(what, real, st, self.euid)
        if own is not None:
            through = f" (reached through {path})" if via_link else ""
            problems.append(Problem(own.message + through, own.path, own.fixes, own.owner))
        return Verdict(Path(path), real, st, tuple(problems), via_link)

    def path_problem(self, path: Path, what: str, *, folder: bool = False) -> str | None:
        """Why ``path`` is not safe to trust (every reason, ``; ``-separated), or None.
        Raises FileNotFoundError when it does not exist."""
        return self.judge(path, what, folder=folder).message

    def open(self, verdict: Verdict, flags: int = os.O_RDONLY) -> int:
        """Open what ``verdict`` checked and nothing else: its resolved path (no one else can
        change what that names), never following a link, then the open file compared with the
        one judged. Raises Untrusted when it was refused or has changed since."""
        if verdict.problems:
            raise Untrusted(verdict.problems)
        fd = os.open(verdict.real, flags | _OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (verdict.st.st_dev, verdict.st.st_ino):
                raise Untrusted(
                    (
                        Problem(
                            f"{verdict.shown} changed while it was checked; try again", verdict.real
                        ),
                    )
                )
            own = owner_issue("file", verdict.real, st, self.euid)  # changed since judged
            if own is not None:
                raise Untrusted((own,))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def nearest_existing(self, path: Path, what: str) -> list[Problem]:
        """For a folder that does not exist yet (it will be created there): what is wrong with
        the nearest folder above it that does, and on the way to it. That folder is judged
        as one that holds an entry: a sticky one (a fresh tmpfs, /tmp) will do."""
        above = Path(os.getcwd(), path)  # not abspath(): see _walk
        while True:
            try:
                real, st, found, _ = self._walk(above)
                break
            except FileNotFoundError:
                if above.parent == above:
                    raise
                above = above.parent
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), real)
        _, problem = self._folder(real)
        return _framed(what, str(path), [*found, *([problem] if problem is not None else [])])


def _framed(what: str, shown: str, found: list[Problem]) -> list[Problem]:
    """Problems of folders and links on the way, each once, said of the path they spoil."""
    seen: set[str] = set()
    out = []
    for p in found:
        if p.path not in seen:
            seen.add(p.path)
            out.append(
                Problem(f"{what} {shown} cannot be trusted: {p.message}", p.path, p.fixes, p.owner)
            )
    return out
