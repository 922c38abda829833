"""Opening the state database file: the connection and its settings, telling damage from
other failures, and moving a damaged file aside (never overwriting it)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from taskd.errors import StateError


class CorruptError(sqlite3.DatabaseError):
    """PRAGMA quick_check found damage."""


_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, CorruptError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def connect(path: Path) -> sqlite3.Connection:
    """The one place the daemon opens ``state.db`` for writing; settings applied, the file
    checked for damage (CorruptError)."""
    # A short busy timeout: the connection is used on the event loop, and another program
    # holding a lock must cost a failed (retried) flush, not a 5 s stall of every job.
    db = sqlite3.connect(path, timeout=0.25, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process being killed (the OS has it);
        # only a power loss can drop the last commits, never corrupt the file.
        db.execute("PRAGMA synchronous=NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise CorruptError(f"integrity check failed: {check[0] if check else 'no answer'}")
    except BaseException:
        db.close()
        raise
    return db


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
