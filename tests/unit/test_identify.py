"""Telling whose file state.db is without writing: each way of reading it, and that no file
of the database changes (nor is one added) whatever it holds."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from taskd.errors import StateError
from taskd.state import identify
from taskd.state.dbfile import APPLICATION_ID
from taskd.state.identify import foreign_reason


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _wal_db(src: Path, script: str) -> sqlite3.Connection:
    c = sqlite3.connect(src, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.executescript(script)
    return c


def _copy(src: Path, state: Path, suffixes: tuple[str, ...]) -> Path:
    """Copy src's files (as a backup taken while it is open would) to state/state.db."""
    state.mkdir(mode=0o700, exist_ok=True)
    for s in suffixes:
        shutil.copy(f"{src}{s}", f"{state / 'state.db'}{s}")
        os.chmod(f"{state / 'state.db'}{s}", 0o600)
    return state / "state.db"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


class TestHeader:
    """The 100 bytes at the start decide most files with no SQLite connection."""

    def test_empty_file_is_new(self, state: Path) -> None:
        (state / "state.db").touch(mode=0o600)
        assert foreign_reason(state / "state.db") is None

    def test_not_sqlite_is_left_to_the_damage_check(self, state: Path) -> None:
        db = state / "state.db"
        db.write_bytes(b"hello, not a database" * 10)
        db.chmod(0o600)
        assert foreign_reason(db) is None

    @pytest.mark.parametrize(
        ("pragma", "said"),
        [
            ("application_id = 42", "application_id is 0x0000002a"),
            ("user_version = 3", "user_version is 3"),
        ],
    )
    def test_stamps(self, state: Path, pragma: str, said: str) -> None:
        db = state / "state.db"
        with contextlib.closing(sqlite3.connect(db)) as c:
            c.execute(f"PRAGMA {pragma}")
        db.chmod(0o600)
        assert said in (foreign_reason(db) or "")

    def test_taskd_stamp(self, state: Path) -> None:
        db = state / "state.db"
        with contextlib.closing(sqlite3.connect(db)) as c:
            c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            c.execute("CREATE TABLE anything (a)")  # the stamp decides
        db.chmod(0o600)
        assert foreign_reason(db) is None


class TestWal:
    """Tables only in the -wal are seen, and nothing is written."""

    def test_a_private_folder_left_by_a_kill_goes(self, tmp_path: Path, state: Path) -> None:
        writer = _wal_db(tmp_path / "src.db", "CREATE TABLE orders (a)")
        db = _copy(tmp_path / "src.db", state, ("", "-wal"))
        writer.close()
        before = _snapshot(state)
        (state / ".identify-x1y2").mkdir()
        os.link(db, state / ".identify-x1y2" / "state.db")
        assert "orders" in (foreign_reason(db) or "")
        assert _snapshot(state) == before

    @pytest.mark.parametrize("with_shm", [False, True])
    def test_foreign_tables_in_the_wal(self, tmp_path: Path, state: Path, with_shm: bool) -> None:
        writer = _wal_db(
            tmp_path / "src.db", "CREATE TABLE orders (a); INSERT INTO orders VALUES (1)"
        )
        db = _copy(tmp_path / "src.db", state, ("", "-wal", "-shm") if with_shm else ("", "-wal"))
        writer.close()
        before = _snapshot(state)
        assert "tables that are not taskd's (orders)" in (foreign_reason(db) or "")
        assert _snapshot(state) == before  # no private folder left, no -shm made

    def test_a_stale_shm_is_read_around(self, tmp_path: Path, state: Path) -> None:
        writer = _wal_db(tmp_path / "src.db", "CREATE TABLE orders (a)")
        db = _copy(tmp_path / "src.db", state, ("", "-wal"))
        writer.close()
        Path(f"{db}-shm").write_bytes(b"\0" * 32768)
        before = _snapshot(state)
        assert "orders" in (foreign_reason(db) or "")
        assert _snapshot(state) == before

    def test_taskd_tables_in_the_wal(self, tmp_path: Path, state: Path) -> None:
        from tests.unit.test_history_reader import SCHEMA_1

        writer = _wal_db(tmp_path / "src.db", SCHEMA_1)
        db = _copy(tmp_path / "src.db", state, ("", "-wal"))
        writer.close()
        assert foreign_reason(db) is None

    def test_no_link_no_guess(self, tmp_path: Path, state: Path, monkeypatch) -> None:
        writer = _wal_db(tmp_path / "src.db", "CREATE TABLE orders (a)")
        db = _copy(tmp_path / "src.db", state, ("", "-wal"))
        writer.close()
        before = _snapshot(state)

        def no_link(*args: object, **kw: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(identify.os, "link", no_link)
        with pytest.raises(StateError) as err:
            foreign_reason(db)
        assert "without writing" in str(err.value) and "mv " in str(err.value)
        assert _snapshot(state) == before


def test_hot_journal_is_not_rolled_back(tmp_path: Path, state: Path) -> None:
    """A -journal beside a rollback-mode file: read around (immutable), never undone."""
    db = state / "state.db"
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.executescript("CREATE TABLE orders (a); INSERT INTO orders VALUES (1)")
    db.chmod(0o600)
    # A journal that SQLite would take as hot: a header and a page (any bytes will do for
    # what is tested: that nothing reads it as something to undo).
    journal = Path(f"{db}-journal")
    journal.write_bytes(bytes.fromhex("d9d505f920a163d7") + b"\x00" * 4088)
    journal.chmod(0o600)
    before = _snapshot(state)
    assert "orders" in (foreign_reason(db) or "")
    assert _snapshot(state) == before
