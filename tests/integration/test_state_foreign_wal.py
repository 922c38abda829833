"""Another program's SQLite file whose latest commits are not in the main file yet (a -wal,
with or without its -shm, or a hot -journal of a transaction cut short) is refused without
a byte of any of its files changing: taskd tells whose file it is before it opens it for
writing. Opening it read-write first checkpointed the -wal into the main file and deleted
it, and would have rolled the -journal back. A taskd file in the same state is used."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from tests.helpers import TICK_PLUGIN, DaemonProc, daemon_table

pytestmark = pytest.mark.timeout(120)

PLUGINS = {"st.py": TICK_PLUGIN}
JOB = '[jobs.fast]\ntype = "tick"\nevery = "100ms"\n'
SUFFIXES = ("", "-wal", "-shm", "-journal")


def config(state_dir: Path) -> str:
    return daemon_table(state_dir=f'"{state_dir}"') + JOB


def files(db: Path) -> dict[str, str | None]:
    """Each of the database's files: its bytes' digest, or None when it does not exist."""
    return {
        s: hashlib.sha256(Path(f"{db}{s}").read_bytes()).hexdigest()
        if os.path.lexists(f"{db}{s}")
        else None
        for s in SUFFIXES
    }


def refused(d: DaemonProc, db: Path) -> None:
    d.start(wait=False)
    assert d.wait_exit(timeout=30) == 3, d.raw[-20:]
    assert not any("Traceback" in line for line in d.raw), d.raw
    (line,) = d.events("cannot_start")
    assert "not a taskd state database" in line["error"] and str(db) in line["error"], line


def wal_writer(path: Path, script: str) -> sqlite3.Connection:
    """A connection in WAL mode that never checkpoints, after running ``script``: its
    commits are in the -wal only, for as long as it stays open."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.executescript(script)
    return c


ORDERS = "CREATE TABLE orders (id INTEGER PRIMARY KEY, what TEXT);" + "".join(
    f"INSERT INTO orders (what) VALUES ('order {i}');" for i in range(500)
)


class TestForeignWal:
    """Commits in the -wal: refused, every file as it was."""

    @pytest.mark.parametrize("with_shm", [False, True], ids=["copied-no-shm", "crashed-with-shm"])
    def test_refused_untouched(self, daemon_factory, tmp_path: Path, with_shm: bool) -> None:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        src = tmp_path / "other.db"
        writer = wal_writer(src, ORDERS)
        # Copied while the writer has it open (a backup, a crashed program): the commits
        # exist only in the -wal.
        for s in ("", "-wal") + (("-shm",) if with_shm else ()):
            shutil.copy(f"{src}{s}", f"{state / 'state.db'}{s}")
            os.chmod(f"{state / 'state.db'}{s}", 0o600)
        writer.close()
        db = state / "state.db"
        before = files(db)
        assert before["-wal"] is not None
        refused(daemon_factory(config(state), PLUGINS), db)
        assert files(db) == before

    def test_live_writer_refused_untouched(self, daemon_factory, tmp_path: Path) -> None:
        """The other program still has it open, mid-life: its -wal and -shm are in use."""
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        db = state / "state.db"
        writer = wal_writer(db, ORDERS)
        try:
            before = files(db)
            assert before["-wal"] is not None and before["-shm"] is not None
            refused(daemon_factory(config(state), PLUGINS), db)
            assert files(db) == before
            # And the other program goes on with its own file as if taskd never came.
            writer.execute("INSERT INTO orders (what) VALUES ('after')")
            assert writer.execute("SELECT COUNT(*) FROM orders").fetchone()[0] == 501
        finally:
            writer.close()


def _crash_mid_transaction(path: str) -> None:
    """Write past the page cache in a transaction (so the main file is changed and the
    -journal holds the old pages), then die without committing or rolling back."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA cache_size=10")
    c.execute("BEGIN")
    c.executemany("INSERT INTO orders (what) VALUES (?)", [("x" * 500,)] * 2000)
    os._exit(0)


class TestForeignHotJournal:
    """A rollback-mode file with a transaction cut short: the -journal is not rolled back."""

    def test_refused_untouched(self, daemon_factory, tmp_path: Path) -> None:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        db = state / "state.db"
        with contextlib.closing(sqlite3.connect(db)) as c:
            c.executescript(ORDERS)
        os.chmod(db, 0o600)
        proc = multiprocessing.get_context("fork").Process(
            target=_crash_mid_transaction, args=(str(db),)
        )
        proc.start()
        proc.join(30)
        before = files(db)
        assert before["-journal"] is not None and os.path.getsize(f"{db}-journal") > 0
        refused(daemon_factory(config(state), PLUGINS), db)
        assert files(db) == before


class TestOwnWal:
    """A taskd file whose tables are still in its -wal is recognised as taskd's and used."""

    @pytest.mark.parametrize("with_shm", [False, True], ids=["no-shm", "with-shm"])
    def test_schema_1_in_the_wal_is_migrated(
        self, daemon_factory, tmp_path: Path, with_shm: bool
    ) -> None:
        from tests.unit.test_history_reader import SCHEMA_1

        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        src = tmp_path / "old.db"
        writer = wal_writer(src, SCHEMA_1)
        writer.execute("INSERT INTO jobs (name, last_tick) VALUES ('fast', ?)", (time.time(),))
        for s in ("", "-wal") + (("-shm",) if with_shm else ()):
            shutil.copy(f"{src}{s}", f"{state / 'state.db'}{s}")
            os.chmod(f"{state / 'state.db'}{s}", 0o600)
        writer.close()
        d = daemon_factory(config(state), PLUGINS).start()
        d.wait_for("state_migrated", to_schema=3)
        d.wait_for("run", job="fast", count=2, timeout=10)
        assert d.stop() == 0
