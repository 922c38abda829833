"""The state database file and the disk under it: another program's file is never written,
a newer taskd's file is never downgraded, and a full or failing disk is named as such (exit 3
at start; during the run, runs go on and the history catches up once the disk recovers).

The disk faults are real: a small tmpfs filled up (ENOSPC), and an ext4 filesystem on a loop
device whose backing file lives on a small tmpfs, so that the block device's writes fail
with EIO once that tmpfs is full (no device-mapper on the test machines). Root only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TICK_PLUGIN, DaemonProc, daemon_table

pytestmark = pytest.mark.timeout(180)

PLUGINS = {"st.py": TICK_PLUGIN}
JOB = '[jobs.fast]\ntype = "tick"\nevery = "100ms"\n'
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a filesystem: needs root")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config(state_dir: Path, **daemon: str) -> str:
    return daemon_table(state_dir=f'"{state_dir}"', **daemon) + JOB


def start_fails(d: DaemonProc) -> str:
    """Start ``d``, expect exit 3 with one ``cannot_start`` line and no traceback; its error."""
    d.start(wait=False)
    assert d.wait_exit(timeout=30) == 3, d.raw[-20:]
    assert not any("Traceback" in line for line in d.raw), d.raw
    (line,) = d.events("cannot_start")
    assert not d.events("started")
    return str(line["error"])


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem is full."""
    with contextlib.suppress(OSError), path.open("wb") as f:
        block = b"\0" * 4096
        while True:
            f.write(block)
            f.flush()


class TestForeignFile:
    """Another program's SQLite file as state.db: refused with exit 3, left byte for byte."""

    @pytest.mark.parametrize(
        "make",
        [
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'ann')",
            # taskd's own table names, but stamped by another program
            "PRAGMA application_id = 1179406657; CREATE TABLE jobs (name TEXT)",
            "PRAGMA user_version = 7; CREATE TABLE meta (key TEXT, value TEXT)",
        ],
        ids=["other-tables", "other-application-id", "user-version"],
    )
    def test_refused_untouched(self, daemon_factory, tmp_path: Path, make: str) -> None:
        state = tmp_path / "state"
        state.mkdir()
        db = state / "state.db"
        with contextlib.closing(sqlite3.connect(db)) as c:
            c.executescript(make)
        before = digest(db)
        d = daemon_factory(config(state), PLUGINS)
        error = start_fails(d)
        assert str(db) in error and "not a taskd state database" in error, error
        assert "state_dir" in error and "mv " in error, error  # what to do
        assert digest(db) == before
        assert sorted(p.name for p in state.iterdir() if p.name.startswith("state.db")) == [
            "state.db"
        ]

    def test_taskd_file_from_before_application_id_is_used(self, daemon_factory, tmp_path) -> None:
        """A schema-2 file (no application_id) is recognised by its tables and migrated."""
        from tests.unit.test_history_reader import SCHEMA_1

        state = tmp_path / "state"
        state.mkdir()
        with contextlib.closing(sqlite3.connect(state / "state.db")) as c:
            c.executescript(SCHEMA_1)
            c.execute("INSERT INTO jobs (name, last_tick) VALUES ('fast', ?)", (time.time(),))
            c.commit()
        d = daemon_factory(config(state), PLUGINS).start()
        d.wait_for("state_migrated", to_schema=3)
        d.wait_for("run", job="fast", count=2, timeout=10)
        assert d.stop() == 0


class TestNewerSchema:
    """A file written by a newer taskd is refused before anything is written to it."""

    def test_refused_not_downgraded(self, daemon_factory, tmp_path: Path) -> None:
        state = tmp_path / "state"
        d = daemon_factory(config(state), PLUGINS).start()
        d.wait_for("run", job="fast", timeout=10)
        assert d.stop() == 0
        db = state / "state.db"
        with contextlib.closing(sqlite3.connect(db)) as c:
            c.execute("UPDATE meta SET value='99' WHERE key='schema'")
            c.commit()
        # A clean stop leaves no -wal; the file alone is the whole database.
        assert not (state / "state.db-wal").exists()
        before = digest(db)
        again = daemon_factory(config(state), PLUGINS, name="again")
        error = start_fails(again)
        assert "schema 99" in error and "newer" in error, error
        assert digest(db) == before


@root_only
class TestFullDisk:
    """ENOSPC: exit 3 at start; during the run, runs go on and history catches up."""

    def test_full_at_start_is_exit_3(self, daemon_factory, tmp_path: Path) -> None:
        with tmpfs(tmp_path / "small", "256k") as mnt:
            fill(mnt / "filler")
            d = daemon_factory(config(mnt / "state"), PLUGINS)
            error = start_fails(d)
            assert "disk full" in error and "No space left on device" in error, error

    def test_full_at_start_with_database_there(self, daemon_factory, tmp_path: Path) -> None:
        """The state_dir and its database exist (an earlier run); the disk is full since."""
        with tmpfs(tmp_path / "small", "512k") as mnt:
            d = daemon_factory(config(mnt / "state"), PLUGINS).start()
            d.wait_for("run", job="fast", timeout=10)
            assert d.stop() == 0
            fill(mnt / "filler")
            again = daemon_factory(config(mnt / "state"), PLUGINS, name="again")
            error = start_fails(again)
            # The lock file keeps its page: the database is what fails to be written.
            assert "disk full" in error and "state.db" in error, error

    def test_full_while_running(self, daemon_factory, tmp_path: Path) -> None:
        with tmpfs(tmp_path / "small", "2m") as mnt:
            d = daemon_factory(config(mnt / "state"), PLUGINS).start()
            d.wait_for("run", job="fast", count=3, timeout=10)
            fill(mnt / "filler")
            failed = d.wait_for("state_write_failed", timeout=20)[0]
            assert failed["level"] == "error"
            assert "disk full" in failed["error"], failed
            ran = len(d.events("run"))
            d.wait_for("run", job="fast", count=ran + 10, timeout=20)  # runs go on
            (mnt / "filler").unlink()
            d.wait_for("state_write_recovered", timeout=20)
            logged = len(d.events("run"))
            assert d.stop() == 0
            ids = {r["run_id"] for r in d.events("run")}
            with contextlib.closing(sqlite3.connect(mnt / "state" / "state.db")) as c:
                stored = {r[0] for r in c.execute("SELECT run_id FROM runs")}
            # Every run logged, those during the full disk too, is in the history.
            assert ids <= stored, (len(ids - stored), logged)


class TestFullDiskAtStop:
    """SIGTERM while the disk is full: the runs held in memory are not silently dropped."""

    def _full_and_stopping(self, daemon_factory, mnt: Path) -> tuple[DaemonProc, set[str]]:
        """A daemon whose disk filled while it ran, then SIGTERM; the run ids it logged
        while the disk was full (held in memory only)."""
        d = daemon_factory(config(mnt / "state", shutdown_timeout='"1s"'), PLUGINS).start()
        d.wait_for("run", job="fast", count=3, timeout=10)
        fill(mnt / "filler")
        d.wait_for("state_write_failed", timeout=20)
        ran = len(d.events("run"))
        d.wait_for("run", job="fast", count=ran + 10, timeout=20)
        held = {r["run_id"] for r in d.events("run")[ran:]}
        d.signal(signal.SIGTERM)
        (waiting,) = d.wait_for("state_close_waiting", timeout=20)
        assert "disk full" in waiting["error"] and waiting["runs"] >= len(held), waiting
        return d, held

    def test_room_made_while_it_waits_saves_every_run(self, daemon_factory, tmp_path) -> None:
        with tmpfs(tmp_path / "small", "2m") as mnt:
            d, held = self._full_and_stopping(daemon_factory, mnt)
            (mnt / "filler").unlink()
            assert d.wait_exit(timeout=30) == 0, d.raw[-10:]
            assert not d.events("state_not_saved")
            with contextlib.closing(sqlite3.connect(mnt / "state" / "state.db")) as c:
                stored = {r[0] for r in c.execute("SELECT run_id FROM runs")}
            assert held <= stored, len(held - stored)

    def test_no_room_is_exit_3_with_what_was_lost(self, daemon_factory, tmp_path) -> None:
        with tmpfs(tmp_path / "small", "2m") as mnt:
            d, held = self._full_and_stopping(daemon_factory, mnt)
            # Nobody makes room: the wait ends within the stop's own time (shutdown_timeout
            # + the 6 s force grace), and the exit says the state was not saved.
            assert d.wait_exit(timeout=30) == 3, d.raw[-10:]
            (lost,) = d.events("state_not_saved")
            assert lost["level"] == "error" and "disk full" in lost["error"], lost
            assert lost["runs_lost"] >= len(held), (lost, len(held))
            assert "state_dir" in lost["hint"]
            assert not any("Traceback" in line for line in d.raw)
            # Room made later: the next start works and keeps what was saved before.
            (mnt / "filler").unlink()
            again = daemon_factory(config(mnt / "state"), PLUGINS, name="again").start()
            again.wait_for("run", job="fast", timeout=10)
            assert again.stop() == 0
            with contextlib.closing(sqlite3.connect(mnt / "state" / "state.db")) as c:
                stored = {r[0] for r in c.execute("SELECT run_id FROM runs")}
            assert {r["run_id"] for r in d.events("run")[:3]} <= stored


def _have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


@contextlib.contextmanager
def failing_disk(where: Path) -> Iterator[tuple[Path, Path]]:
    """(mount point, backing tmpfs): ext4 on a loop device over a sparse file on a 4 MiB
    tmpfs. Filling that tmpfs makes the loop device's writes fail, which ext4 reports as EIO."""
    with tmpfs(where / "backing", "4m") as back:
        image = back / "disk.img"
        with image.open("wb") as f:
            f.truncate(64 * 2**20)
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                str(image),
            ],
            check=True,
        )
        loop = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        mnt = where / "disk"
        mnt.mkdir()
        try:
            subprocess.run(["mount", loop, str(mnt)], check=True)
            try:
                yield mnt, back
            finally:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)


@root_only
@pytest.mark.skipif(not _have("losetup", "mkfs.ext4"), reason="needs losetup and mkfs.ext4")
class TestIOError:
    """EIO from the disk is reported as an I/O error, never as damage or a rollback error,
    and the runs go on."""

    def test_eio_while_running(self, daemon_factory, tmp_path: Path) -> None:
        try:
            ctx = failing_disk(tmp_path)
            mnt, back = ctx.__enter__()
        except (subprocess.CalledProcessError, OSError) as exc:
            pytest.skip(f"cannot set up a loop device here: {exc}")
        try:
            d = daemon_factory(config(mnt / "state", shutdown_timeout='"1s"'), PLUGINS).start()
            d.wait_for("run", job="fast", count=3, timeout=10)
            fill(back / "filler")
            failed = d.wait_for("state_write_failed", timeout=30)
            errors = [f["error"] for f in failed]
            assert errors[0].startswith("I/O error"), errors
            assert not any("malformed" in e or "cannot rollback" in e for e in errors), errors
            ran = len(d.events("run"))
            d.wait_for("run", job="fast", count=ran + 10, timeout=20)  # runs go on
            # The disk never recovers: the stop waits its own time for it, then says what
            # was lost and exits 3 (not 0 as if all were saved).
            assert d.stop(timeout=30) == 3
            (lost,) = d.events("state_not_saved")
            assert lost["error"].startswith("I/O error") and lost["runs_lost"] >= 10, lost
        finally:
            ctx.__exit__(None, None, None)
