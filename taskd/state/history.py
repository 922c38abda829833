"""The run history, read from outside the daemon (``taskd history``): strictly read-only.

Only the daemon writes ``state.db``; this reader must never create, migrate, lock out or
change it, whether the daemon is running (WAL mode: readers see the last commit and do not
block the writer) or stopped, and whoever runs it (root, or a user who may only read the
files). How the file is opened follows from what SQLite does:

- ``mode=ro`` needs the ``-shm`` index beside the database. When the ``-wal`` and ``-shm``
  files are absent (a daemon that stopped cleanly removes them) it *creates* them, and leaves
  them behind; where the folder is not writable by the reader it cannot open at all
  (SQLITE_READONLY_DIRECTORY).
- ``immutable=1`` creates nothing and takes no locks, but ignores the ``-wal``: after a
  ``kill -9`` the newest commits live only there, so it would silently lose them.

So: with a ``-wal`` present, or a daemon holding ``taskd.lock``, use ``mode=ro`` (SQLite can
use an existing ``-shm`` even when it may not write it; when it may, the first connection
after a crash rebuilds that index there, which changes no data: the ``-shm`` is a cache of
where pages are in the ``-wal``, and the database and ``-wal`` are left as they were). With neither, everything is in the
database file, nothing writes it (only a daemon does, and none holds the lock), and
``immutable=1`` reads it touching nothing. A daemon that starts during that read could
checkpoint into the file under us; the file is compared before and after, and the read is
done again (as ``mode=ro``) if it changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from taskd.errors import StateError
from taskd.state import files
from taskd.state.schema import SCHEMA_VERSION

__all__ = ["FAILED_OUTCOMES", "TRUNCATED_MARK", "NoStateDatabase", "is_truncated", "read_history"]

# What ``failed=True`` selects: every run that ended without succeeding.
FAILED_OUTCOMES = ("failed", "timed_out", "interrupted", "cancelled")
# The end of a result the store cut to its size limit (taskd.state.writes.bounded).
TRUNCATED_MARK = "...(truncated)"
# The store's own wording for a run the daemon died during (StateStore.open).
_INTERRUPTED_ERROR = "the daemon stopped during this run"
_ATTEMPTS = 3  # reads of a file that a starting daemon keeps changing, before giving up


class NoStateDatabase(StateError, FileNotFoundError):
    """There is no state database at the path: taskd never ran with that state_dir (or the
    state_dir is not the one the operator thinks)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no state database at {path}: has taskd run with this state_dir?")
        self.path = path


def is_truncated(result: Any) -> bool:
    """Whether a history result is the store's cut-down form of a larger one."""
    return isinstance(result, str) and result.endswith(TRUNCATED_MARK)


def read_history(
    db_path: Path,
    *,
    job: str | None = None,
    limit: int = 20,
    failed: bool = False,
    since: float | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` runs, newest first, optionally only of ``job``, only those that
    did not succeed (``failed``: an outcome in FAILED_OUTCOMES), only those started at or
    after ``since`` (epoch seconds).

    Each row: run_id, job, scheduled, started (epoch seconds), attempts, duration (seconds or
    None while running), outcome, error, cause (what started it: schedule, catchup, manual,
    exec), result (the job's return value parsed from JSON; the raw text if it does not
    parse; None from a database older than results in history), late (started - scheduled).

    A run recorded as ``running`` while no daemon holds the state_dir's lock is shown as
    ``interrupted``, as the daemon will record it when it next starts.

    Raises NoStateDatabase when the file does not exist, StateError when it cannot be read
    or was written by a newer taskd."""
    daemon_up = daemon_running(db_path.parent)
    for attempt in range(_ATTEMPTS):
        before = _identity(db_path)
        if before is None:
            raise NoStateDatabase(db_path)
        # SQLite follows a symlink to the database: one planted in a state_dir that others
        # can write would have root read (and, with mode=ro, create a -shm beside) any file.
        files.refuse_links(db_path)
        immutable = not daemon_up and not _journal_present(db_path)
        try:
            with _connect(db_path, immutable=immutable) as db:
                rows = _query(db, db_path, job, limit, failed, since, daemon_up)
        except sqlite3.DatabaseError as exc:
            if immutable and _identity(db_path) != before and attempt + 1 < _ATTEMPTS:
                daemon_up = daemon_running(db_path.parent)
                continue  # the file changed under the read: a daemon started
            raise _state_error(db_path, exc) from exc
        if not immutable or _identity(db_path) == before:
            return rows
        daemon_up = daemon_running(db_path.parent)
    raise StateError(f"state database {db_path} kept changing while being read; try again")


# -- opening -----------------------------------------------------------------------------------


def daemon_running(state_dir: Path) -> bool:
    """Whether a daemon holds ``state_dir/taskd.lock`` (taskd.state.lock.InstanceLock).

    Probed with a non-blocking shared flock on a read-only descriptor, released at once. A
    daemon starting in that same instant would see the lock taken and refuse to start; the
    window is the length of two system calls. When the lock file cannot be opened for
    another reason than not existing, the answer is "maybe", taken as yes: that only ever
    chooses the more careful way to open the database."""
    try:
        # Never through a symlink, and never waiting: a link to a FIFO would hang the read.
        fd = os.open(
            state_dir / "taskd.lock",
            os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
        )
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: a daemon holds it; anything else (ENOLCK): "maybe"
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read state database {path}: {exc.strerror or exc}") from exc
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _journal_present(db_path: Path) -> bool:
    # A -wal may hold commits the database file lacks; a -journal (a rollback-mode database
    # some other tool wrote) may hold a half-done transaction to undo. Either needs SQLite's
    # normal reading path, which immutable=1 skips.
    return any(os.path.lexists(f"{db_path}{suffix}") for suffix in ("-wal", "-journal"))


@contextlib.contextmanager
def _connect(db_path: Path, *, immutable: bool) -> Iterator[sqlite3.Connection]:
    mode = "immutable=1" if immutable else "mode=ro"
    uri = f"file:{quote(str(db_path.absolute()))}?{mode}"
    db = sqlite3.connect(uri, uri=True, timeout=2.0, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def _state_error(db_path: Path, exc: sqlite3.Error) -> StateError:
    name = getattr(exc, "sqlite_errorname", "")
    if name in ("SQLITE_CANTOPEN", "SQLITE_READONLY_DIRECTORY", "SQLITE_READONLY_CANTINIT"):
        hint = (
            "; it is readable only by the daemon's user or root, or its -shm file cannot be "
            "used by this user: run as the daemon's user or with sudo"
        )
    elif name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        hint = "; the file is damaged or not a taskd database (the daemon moves such a file aside when it starts)"
    else:
        hint = ""
    return StateError(f"cannot read state database {db_path}: {exc}{hint}")


# -- reading -----------------------------------------------------------------------------------

_COLUMNS = ("run_id", "job", "scheduled", "started", "attempts", "duration", "outcome", "error")


def _query(
    db: sqlite3.Connection,
    db_path: Path,
    job: str | None,
    limit: int,
    failed: bool,
    since: float | None,
    daemon_up: bool,
) -> list[dict[str, Any]]:
    _check_schema(db, db_path)
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    # Schema 1 (before results were kept per run) has no result column.
    result_col = "result" if "result" in columns else "NULL"
    where: list[str] = []
    params: list[Any] = []
    if job is not None:
        where.append("job = ?")
        params.append(job)
    if failed:
        outcomes = FAILED_OUTCOMES if daemon_up else (*FAILED_OUTCOMES, "running")
        where.append(f"outcome IN ({', '.join('?' * len(outcomes))})")
        params.extend(outcomes)
    if since is not None:
        where.append("started >= ?")
        params.append(since)
    sql = f"SELECT {', '.join(_COLUMNS)}, trigger, {result_col} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    # seq is the order runs started in (the row is written when a run starts), and the
    # primary key: newest-first with a LIMIT reads only the rows it returns.
    sql += " ORDER BY seq DESC LIMIT ?"
    params.append(limit)
    out = []
    for values in db.execute(sql, params):
        row = dict(zip(_COLUMNS, values[:-2], strict=True))
        row["cause"] = values[-2]
        row["result"] = _parse(values[-1])
        row["late"] = row["started"] - row["scheduled"]
        if row["outcome"] == "running" and not daemon_up:
            row["outcome"], row["error"] = "interrupted", row["error"] or _INTERRUPTED_ERROR
        out.append(row)
    return out


def _check_schema(db: sqlite3.Connection, db_path: Path) -> None:
    has_meta = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
    ).fetchone()
    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if has_meta else None
    if row is None:
        raise StateError(
            f"{db_path} is not a taskd state database (it has no schema version); check state_dir"
        )
    try:
        version = int(row[0])
    except ValueError:
        raise StateError(f"{db_path}: unreadable schema version {row[0]!r}") from None
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state database {db_path} has schema {version}, newer than this taskd "
            f"({SCHEMA_VERSION}) can read; use the taskd that wrote it, or upgrade this one"
        )


def _parse(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:  # not written by this taskd's store; the text is still worth showing
        return text
