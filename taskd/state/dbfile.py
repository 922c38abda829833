"""Opening the state database file: the connection, what the file is (ours, new, another
program's), telling damage from other failures, saying what an error means, and moving a
damaged file aside (never overwriting it)."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from taskd.errors import StateError

# PRAGMA application_id of every state.db taskd creates ("tskd"), so that `file` and taskd
# itself can tell it from another program's SQLite file. Files made before it (schema 1
# and 2) carry 0 and are recognised by their tables.
APPLICATION_ID = int.from_bytes(b"tskd", "big")
# Every table any taskd schema has had; a file with another one is not taskd's.
TASKD_TABLES = frozenset({"meta", "jobs", "runs", "shared"})


class CorruptError(sqlite3.DatabaseError):
    """PRAGMA quick_check found damage."""


class ForeignDatabase(StateError):
    """``state.db`` is another program's SQLite file: never written, never moved."""


_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26


def _primary(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    return isinstance(exc, CorruptError) or _primary(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def is_io_error(exc: BaseException) -> bool:
    return _primary(exc) == _SQLITE_IOERR or getattr(exc, "errno", None) == errno.EIO


def _no_space(where: Path | None) -> bool:
    """Whether the filesystem holding ``where`` has no space left for us."""
    if where is None:
        return False
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail == 0


def describe(exc: BaseException, *, where: Path | None = None, after_io_error: bool = False) -> str:
    """What a failed read or write of a state file means, in words an operator can act on.
    ``where``: a path on the state filesystem, looked at when SQLite reports an I/O error
    (it does so for a full disk too, e.g. SQLITE_IOERR_SHMSIZE, and Python does not give
    the errno). ``after_io_error``: the disk already failed a read or write since the file
    was opened, so damage seen now is most likely that failure's doing."""
    name = getattr(exc, "sqlite_errorname", None)
    raw = f"{exc} ({name})" if name else str(exc)
    primary = _primary(exc)
    code = getattr(exc, "errno", None)
    if primary == _SQLITE_IOERR and _no_space(where):
        return f"disk full: {raw}; free space on the filesystem holding state_dir"
    if primary == _SQLITE_IOERR or code == errno.EIO:
        return (
            f"I/O error: {raw}; the disk or filesystem under state_dir failed a read or write "
            "(see the kernel log, dmesg)"
        )
    if after_io_error and primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return (
            f"I/O error: after the disk failed a write, the file reads back damaged ({raw}); "
            "see the kernel log (dmesg) and the disk's health"
        )
    if primary == _SQLITE_FULL or code in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {raw}; free space on the filesystem holding state_dir"
    if primary == _SQLITE_READONLY or code == errno.EROFS:
        return (
            f"read-only: {raw}; the filesystem holding state_dir was mounted (or remounted "
            "after errors) read-only, or the file is not writable"
        )
    return raw


@dataclass(frozen=True, slots=True)
class Identity:
    """What an open SQLite file is, read without writing anything."""

    application_id: int
    user_version: int
    tables: frozenset[str]
    schema: str | None  # meta.schema, when the file has a meta table holding one

    @property
    def new(self) -> bool:
        return self.application_id == 0 and self.user_version == 0 and not self.tables

    def foreign_reason(self) -> str | None:
        """Why this is not a taskd state database, or None if it is one (or new)."""
        stamped = stamp_reason(self.application_id, self.user_version)
        if stamped is not None or self.application_id == APPLICATION_ID or self.new:
            return stamped
        # Made by taskd before application_id was set: only taskd's tables, a schema number.
        others = sorted(self.tables - TASKD_TABLES)
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            return f"it has tables that are not taskd's ({shown})"
        if self.schema is None:
            return "it has no taskd schema version (table meta, key schema)"
        return None


def stamp_reason(application_id: int, user_version: int) -> str | None:
    """Why a file stamped so (PRAGMA application_id, user_version) is not taskd's; None
    when the stamps are taskd's, or both 0 (new, or made before application_id)."""
    if application_id == APPLICATION_ID:
        return None
    if application_id != 0:
        return f"its application_id is {application_id:#010x}, not taskd's {APPLICATION_ID:#010x}"
    if user_version != 0:
        return f"its user_version is {user_version} (taskd leaves it 0)"
    return None


def foreign_database(path: Path, reason: str) -> ForeignDatabase:
    return ForeignDatabase(
        f"{path} is not a taskd state database: {reason}. taskd has not changed it. "
        "If state_dir points at another program's folder, set [daemon] state_dir to a "
        "folder of taskd's own; if the file is not needed there, move it away "
        f"(mv {path} {path}.old) and start again"
    )


def identify(db: sqlite3.Connection) -> Identity:
    """Read what the file is; writes nothing."""
    app_id = int(db.execute("PRAGMA application_id").fetchone()[0])
    user_version = int(db.execute("PRAGMA user_version").fetchone()[0])
    tables = frozenset(
        str(r[0])
        for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        )
    )
    schema = None
    if "meta" in tables:
        try:
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.OperationalError:  # a meta table without taskd's columns
            row = None
        schema = None if row is None else str(row[0])
    return Identity(app_id, user_version, tables, schema)


def connect(path: Path) -> sqlite3.Connection:
    """The one place the daemon opens ``state.db`` for writing. Only reads happen here (the
    damage check); the caller decides whether the file is taskd's before anything is
    written, then calls :func:`configure`."""
    # A short busy timeout: the connection is used on the event loop, and another program
    # holding a lock must cost a failed (retried) flush, not a 5 s stall of every job.
    db = sqlite3.connect(path, timeout=0.25, isolation_level=None, check_same_thread=False)
    try:
        check = db.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise CorruptError(f"integrity check failed: {check[0] if check else 'no answer'}")
    except BaseException:
        db.close()
        raise
    return db


def configure(db: sqlite3.Connection) -> None:
    """The settings taskd runs with; the first write to a new or older file."""
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives the process being killed (the OS has it); only
    # a power loss can drop the last commits, never corrupt the file.
    db.execute("PRAGMA synchronous=NORMAL")
    # Debian's SQLite zeroes every freed page (SECURE_DELETE): deleting a run with an 8 KB
    # result then writes its two overflow pages, and a retention pass over a backlog wrote
    # 431 WAL frames (10 ms a pass, 47 ms at worst) instead of 28 (2.2 ms). FAST still
    # zeroes deleted rows in the pages written anyway; a freed page keeps its old bytes (in
    # this 0600 file) until a new row reuses it, as with SQLite's own default (off).
    db.execute("PRAGMA secure_delete=FAST")


def rollback(db: sqlite3.Connection) -> None:
    """Undo the open transaction, if SQLite has not already (it does after an I/O error or
    a full disk): a failing ROLLBACK must not replace the error that caused it ("cannot
    rollback - no transaction is active" hid every disk error before)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` (and its -wal and -shm) to ``<name>.<why>-<time>``, never replacing an
    earlier copy; the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while any(Path(str(aside) + s).exists() for s in ("", "-wal", "-shm")):
        # Never replace an earlier copy: each was kept for someone to look at.
        n += 1
        aside = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    try:
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(path) + suffix)
            if src.exists():
                src.rename(Path(str(aside) + suffix))
    except OSError as exc:
        raise StateError(
            f"state database {path} is {why} and cannot be moved aside ({exc}); "
            f"move it away by hand"
        ) from exc
    return aside
