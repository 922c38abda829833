"""Whose file ``state.db`` is, found before SQLite opens it for writing, without changing a
byte of it or of its ``-wal``, ``-shm`` and ``-journal``.

A read-write connection is not neutral even when it only reads: closing it checkpoints a
``-wal`` into the main file and deletes it, and opening it rolls a hot ``-journal`` back.
Done to another program's database, that rewrites its files behind its back. So:

- the 100-byte header is read through a no-follow descriptor: not SQLite's (or too short)
  leaves the verdict to the damage check, which moves a damaged file aside, never writing
  into it; taskd's ``application_id`` says taskd's; another ``application_id`` or a
  ``user_version`` says another program's;
- otherwise (an older taskd file carries neither) the table names decide, read by a
  connection that cannot write: ``immutable=1`` on the main file alone when there is no
  ``-wal`` with content (a ``-journal`` is then ignored: it is only undone by a writer);
  ``mode=ro&readonly_shm=1`` when there is a ``-wal`` and its ``-shm`` (every file opened
  read-only); when the ``-shm`` is missing, SQLite needs one it can write, so the database
  and its ``-wal`` are hard-linked into a private folder in state_dir and read from there,
  the ``-shm`` SQLite makes being the private folder's own."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import quote

from taskd.errors import StateError
from taskd.state import files
from taskd.state.dbfile import APPLICATION_ID, Identity, identify, stamp_reason

MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
_USER_VERSION = slice(60, 64)
_APPLICATION_ID = slice(68, 72)
_PRIVATE = ".identify-"  # the private folder's name, in state_dir


def foreign_reason(path: Path) -> str | None:
    """Why ``path`` is another program's SQLite database, or None when it is taskd's, new,
    or not a readable database at all (the caller's damage check judges that one).
    Raises StateError when that cannot be told without writing."""
    header = _header(path)
    if header and (len(header) < HEADER_SIZE or not header.startswith(MAGIC)):
        return None
    if header:
        app_id = int.from_bytes(header[_APPLICATION_ID], "big", signed=True)
        user_version = int.from_bytes(header[_USER_VERSION], "big", signed=True)
        if app_id == APPLICATION_ID or app_id != 0 or user_version != 0:
            return stamp_reason(app_id, user_version)  # the tables are not needed
    try:
        ident = _read(path)
    except sqlite3.DatabaseError:
        return None  # unreadable: the damage check that follows moves it aside
    return ident.foreign_reason()


def _header(path: Path) -> bytes:
    fd = files.open_file(path, os.O_RDONLY)
    try:
        return os.pread(fd, HEADER_SIZE, 0)
    finally:
        os.close(fd)


def _has_content(path: str) -> bool:
    try:
        return os.lstat(path).st_size > 0
    except FileNotFoundError:
        return False


def _read(path: Path) -> Identity:
    wal, shm = f"{path}-wal", f"{path}-shm"
    if not _has_content(wal):
        return _identify(f"file:{quote(str(path.absolute()))}?mode=ro&immutable=1")
    if os.path.lexists(shm):
        with contextlib.suppress(sqlite3.OperationalError):
            # A -shm that does not fit its -wal (left by a crash) would need rebuilding,
            # which a read-only -shm does not allow: then as if there were none.
            return _identify(f"file:{quote(str(path.absolute()))}?mode=ro&readonly_shm=1")
    for stale in path.parent.glob(f"{_PRIVATE}*"):
        # Left by a daemon killed while reading (this one holds the instance lock now).
        shutil.rmtree(stale, ignore_errors=True)
    private = Path(tempfile.mkdtemp(prefix=_PRIVATE, dir=path.parent))
    try:
        copy = private / path.name
        try:
            os.link(path, copy, follow_symlinks=False)
            os.link(wal, f"{copy}-wal", follow_symlinks=False)
        except OSError as exc:
            raise StateError(
                f"cannot tell whether {path} is taskd's without writing to it: its -wal holds "
                f"commits and it has no -shm, and linking them to read them apart failed "
                f"({exc.strerror or exc}); if it is another program's file, move it away "
                f"(mv {path} {path}.old; mv {wal} {path}.old-wal); if it is taskd's, run "
                f"sqlite3 {path} 'PRAGMA quick_check' as its owner once, then start again"
            ) from exc
        return _identify(f"file:{quote(str(copy))}?mode=ro")
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _identify(uri: str) -> Identity:
    db = sqlite3.connect(uri, uri=True, timeout=0.25, isolation_level=None)
    try:
        return identify(db)
    finally:
        db.close()
