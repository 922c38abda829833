"""Opening files under ``state_dir`` safely, also as root on a folder someone else can reach.

A daemon that follows a symlink planted in its state_dir truncates or overwrites whatever the
link points at (``ticks.journal -> /etc/shadow``), with its own privileges. So:

- the state_dir must be trusted (taskd.trust: owned by root or the daemon's user, not
  writable by group or others, nor is any folder above it) or the daemon does not start;
  one it creates itself is 0700;
- every file in it is opened with ``O_NOFOLLOW`` (a symlink is refused, never followed) and
  checked on the open descriptor: a regular file, owned by root or the daemon's user, not
  writable by group or others. Files are created 0600: they hold job results;
- SQLite opens its files by path itself, so ``state.db`` is checked (or created 0600, with
  ``O_EXCL``) just before each connection, and so are its ``-wal``, ``-shm`` and
  ``-journal`` companions (SQLite creates those with the database file's mode and opens
  them with ``O_NOFOLLOW`` itself; a planted link there would only fail obscurely).

Files created by an older taskd (state.db was 0644) are narrowed to 0600 when opened,
logged as ``state_file_mode_narrowed``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import structlog

from taskd.errors import StateError
from taskd.trust import TrustChecker, owner_problem

log = structlog.get_logger("taskd.state")

FILE_MODE = 0o600
DIR_MODE = 0o700
DB_COMPANIONS = ("-wal", "-shm", "-journal")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def prepare_dir(state_dir: Path) -> None:
    """Create ``state_dir`` (0700) if it is missing, then refuse it unless it is trusted.
    Raises StateError with the path and the fix."""
    try:
        if not os.path.lexists(state_dir):
            state_dir.parent.mkdir(parents=True, exist_ok=True)
            # Made by another process meanwhile: checked below all the same.
            with contextlib.suppress(FileExistsError):
                os.mkdir(state_dir, DIR_MODE)
        problem = TrustChecker().path_problem(state_dir, "state_dir", folder=True)
    except OSError as exc:
        raise StateError(
            f"cannot create or check state_dir {state_dir}: {exc.strerror or exc}"
        ) from exc
    if problem is not None:
        raise StateError(problem)


def open_file(path: Path, flags: int) -> int:
    """``os.open`` of a file in state_dir that never follows a symlink and refuses anything
    but a trusted regular file; one it creates is 0600. Raises StateError saying what to do."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(_link_refused(path)) from exc
        raise StateError(f"cannot open {path}: {exc.strerror or exc}; check state_dir") from exc
    try:
        _check_open(path, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare_database(db_path: Path) -> None:
    """Make ``db_path`` safe for SQLite to open by path: each of the database and its
    companions that exists must be a trusted regular file and no symlink; a missing database
    is created here, empty and 0600 (SQLite takes an empty file for a new database, and gives
    its -wal and -shm the same mode)."""
    for suffix in ("", *DB_COMPANIONS):
        path = Path(f"{db_path}{suffix}")
        if os.path.lexists(path):
            os.close(open_file(path, os.O_RDONLY))
    if not os.path.lexists(db_path):
        try:
            fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, FILE_MODE)
        except FileExistsError:  # created meanwhile (only root or we can): check it
            fd = open_file(db_path, os.O_RDONLY)
        except OSError as exc:
            raise StateError(
                f"cannot create state database {db_path}: {exc.strerror or exc}; check state_dir"
            ) from exc
        os.close(fd)


def refuse_links(db_path: Path) -> None:
    """For readers (``taskd history``, maybe not the daemon's user): refuse a database or
    companion that is a symlink or not a regular file. Ownership is not checked: a reader
    reads what the daemon's user owns."""
    for suffix in ("", *DB_COMPANIONS):
        path = Path(f"{db_path}{suffix}")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateError(f"cannot check {path}: {exc.strerror or exc}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise StateError(_link_refused(path))
        if not stat.S_ISREG(st.st_mode):
            raise StateError(_not_regular(path))


def audit(state_dir: Path) -> list[str]:
    """What the daemon would refuse in ``state_dir``, for ``taskd check``, touching nothing:
    a state_dir or state file writable by group or others (or a folder above it that is), a
    symlink or other odd file where taskd keeps its own. Ownership is judged as if the daemon
    ran as the state_dir's owner: ``check`` cannot know which user that will be (systemd's
    DynamicUser picks it at start); the daemon checks it itself when it starts."""
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:  # made at start, in the nearest folder that exists: it must be safe
        existing = os.path.realpath(state_dir)
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        problem = TrustChecker().parents_problem(os.path.join(existing, "state_dir"))
        return [] if problem is None else [f"state_dir {state_dir} cannot be trusted: {problem}"]
    except PermissionError:  # not this user's to look into (/var/lib/private is 0700)
        return []
    except OSError as exc:
        return [f"cannot check state_dir {state_dir}: {exc.strerror or exc}"]
    checker = TrustChecker(euid=st.st_uid)
    try:
        problem = checker.path_problem(state_dir, "state_dir", folder=True)
    except OSError as exc:
        problem = f"cannot check state_dir {state_dir}: {exc.strerror or exc}"
    problems = [] if problem is None else [problem]
    db = state_dir / "state.db"
    for path in (
        db,
        *(Path(f"{db}{s}") for s in DB_COMPANIONS),
        state_dir / "ticks.journal",
        state_dir / "taskd.lock",
    ):
        try:
            fst = os.lstat(path)
        except OSError:  # absent, or the folder is not ours to read: the daemon will see
            continue
        if stat.S_ISLNK(fst.st_mode):
            problems.append(_link_refused(path))
        elif not stat.S_ISREG(fst.st_mode):
            problems.append(_not_regular(path))
        else:
            problem = owner_problem("state file", path, fst, st.st_uid)
            if problem is not None:
                problems.append(problem)
    return problems


def _check_open(path: Path, fd: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise StateError(_not_regular(path))
    euid = os.geteuid()
    problem = owner_problem("state file", path, st, euid)
    if problem is not None:
        raise StateError(problem)
    if st.st_mode & 0o077 and st.st_uid == euid:
        # Made by an older taskd (0644) or under a loose umask: job results are not for
        # every user of the host to read.
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)
        log.info(
            "state_file_mode_narrowed",
            path=str(path),
            was=f"{stat.S_IMODE(st.st_mode):04o}",
            now=f"{stat.S_IMODE(st.st_mode) & 0o700:04o}",
        )


def _link_refused(path: Path) -> str:
    return (
        f"{path} is a symbolic link; taskd never follows links in state_dir (one planted there "
        f"would make it overwrite the file it points to): rm {path}, and check who can write to "
        f"{path.parent}"
    )


def _not_regular(path: Path) -> str:
    return f"{path} is not a regular file; taskd keeps only its own files there: remove it"
