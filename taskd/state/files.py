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
from taskd.trust import Problem, TrustChecker, owner_issue, owner_problem

log = structlog.get_logger("taskd.state")

FILE_MODE = 0o600
DIR_MODE = 0o700
DB_COMPANIONS = ("-wal", "-shm", "-journal")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def prepare_dir(state_dir: Path) -> Path:
    """Create ``state_dir`` (0700) if it is missing, then refuse it unless it is trusted, along
    the path as given and the one it resolves to. Returns that resolved path: every folder on
    it is trusted, so no one else can change what it names, and files are opened through it.
    Raises StateError with the path and the fix."""
    trust = TrustChecker()
    try:
        if not os.path.lexists(state_dir):
            # Nothing is made through a folder someone else controls.
            above = trust.nearest_existing(state_dir, "state_dir")
            if above:
                raise StateError("; ".join(p.message for p in above))
            state_dir.parent.mkdir(parents=True, exist_ok=True)
            # Made by another process meanwhile: checked below all the same.
            with contextlib.suppress(FileExistsError):
                os.mkdir(state_dir, DIR_MODE)
        verdict = trust.judge(state_dir, "state_dir", folder=True)
    except StateError:
        raise
    except OSError as exc:
        raise StateError(
            f"cannot create or check state_dir {state_dir}: {exc.strerror or exc}"
        ) from exc
    if verdict.message is not None:
        raise StateError(verdict.message)
    return Path(verdict.real)


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
    return [p.message for p in audit_problems(state_dir)]


def audit_problems(state_dir: Path) -> list[Problem]:
    """audit, each problem with its fix apart (taskd.trust_report combines them)."""
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:  # made at start, in the nearest folder that exists: it must be safe
        try:
            return TrustChecker().nearest_existing(state_dir, "state_dir")
        except OSError as exc:
            return [Problem(f"cannot check state_dir {state_dir}: {exc.strerror or exc}")]
    except PermissionError:  # not this user's to look into (/var/lib/private is 0700)
        return []
    except OSError as exc:
        return [Problem(f"cannot check state_dir {state_dir}: {exc.strerror or exc}")]
    checker = TrustChecker(euid=st.st_uid)
    try:
        problems = list(checker.judge(state_dir, "state_dir", folder=True).problems)
    except OSError as exc:
        problems = [Problem(f"cannot check state_dir {state_dir}: {exc.strerror or exc}")]
    db = state_dir / "state.db"
    for path in (
        db,
        *(Path(f"{db}{s}") for s in DB_COMPANIONS),
        state_dir / "ticks.journal",
        state_dir / "ticks.journal.1",  # the second journal file (taskd.state.ticklog)
        state_dir / "taskd.lock",
    ):
        try:
            fst = os.lstat(path)
        except OSError:  # absent, or the folder is not ours to read: the daemon will see
            continue
        if stat.S_ISLNK(fst.st_mode):
            problems.append(Problem(_link_refused(path), str(path)))
        elif not stat.S_ISREG(fst.st_mode):
            problems.append(Problem(_not_regular(path), str(path)))
        else:
            problem = owner_issue("state file", path, fst, st.st_uid)
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
