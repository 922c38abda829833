"""Files under state_dir, as root: planted symlinks are refused, never followed; a state_dir
others can write is refused with the fix; files are created 0600 in a 0700 folder; the tick
journal is read in bounded memory; ``taskd history`` does not follow a planted link."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.helpers import DaemonProc, peak_rss, poll, run_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")

NOBODY = 65534
VICTIM_TEXT = "root's precious file\n"

PLUGIN = """
import taskd


async def echo(ctx) -> str:
    return "ok"


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("echo", echo)]
"""
CONFIG = '[jobs.hello]\ntype = "echo"\non = "startup"\n'


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root-owned file outside state_dir that a planted link points at."""
    path = tmp_path / "victim"
    path.write_text(VICTIM_TEXT)
    return path


def daemon(daemon_factory, config: str = CONFIG) -> DaemonProc:
    d: DaemonProc = daemon_factory(config, {"echo.py": PLUGIN})
    return d


def state_dir(d: DaemonProc, mode: int = 0o700) -> Path:
    path = d.dir / "state"
    path.mkdir(mode=mode)
    os.chmod(path, mode)  # mkdir's mode is cut by the umask
    return path


def refused(d: DaemonProc, *needles: str, victim: Path | None = None, was: bytes = b"") -> str:
    """Start ``d`` and expect exit 3 (state unusable) with a cannot_start naming ``needles``;
    first of all, ``victim`` (a planted link's target) must still hold ``was``."""
    d.lines.clear()  # an earlier run's lines
    d.start(wait=False)
    poll(lambda: d.events("started") or d.proc.poll() is not None, timeout=20)  # type: ignore[union-attr]
    code = d.stop()  # the unfixed daemon starts: stop it, then say what it did
    if victim is not None:
        assert victim.read_bytes() == was, f"{victim} was changed: {victim.read_bytes()[:60]!r}"
    assert not d.events("started"), "the daemon started on it"
    assert code == 3, "\n".join(d.raw[-20:])
    (line,) = d.events("cannot_start")
    for needle in needles:
        assert needle in line["error"], line
    return str(line["error"])


class TestPlantedLinks:
    """A symlink in state_dir is refused, and the file it points at is left as it was."""

    @pytest.mark.parametrize("name", ["ticks.journal", "ticks.journal.1", "taskd.lock", "state.db"])
    def test_link_in_a_root_state_dir(self, daemon_factory, victim: Path, name: str) -> None:
        d = daemon(daemon_factory)
        sd = state_dir(d)
        victim.write_text("") if name == "state.db" else None  # SQLite takes an empty file
        before = victim.read_bytes()
        (sd / name).symlink_to(victim)
        error = refused(
            d, str(sd / name), "symbolic link", f"rm {sd / name}", victim=victim, was=before
        )
        assert "never follows" in error
        assert (sd / name).is_symlink()

    @pytest.mark.parametrize("suffix", ["-wal", "-shm"])
    def test_link_beside_the_database(self, daemon_factory, victim: Path, suffix: str) -> None:
        d = daemon(daemon_factory).start()
        d.wait_for("run", job="hello")
        assert d.stop() == 0
        sd = d.dir / "state"
        for s in ("-wal", "-shm"):
            Path(f"{sd}/state.db{s}").unlink(missing_ok=True)
        link = Path(f"{sd}/state.db{suffix}")
        link.symlink_to(victim)
        refused(d, str(link), "symbolic link", victim=victim, was=VICTIM_TEXT.encode())

    def test_state_dir_of_another_user(self, daemon_factory, victim: Path) -> None:
        """The reported attack: root on a state_dir nobody owns, with the journal linked."""
        d = daemon(daemon_factory)
        sd = state_dir(d, 0o755)
        (sd / "ticks.journal").symlink_to(victim)
        os.lchown(sd / "ticks.journal", NOBODY, NOBODY)
        os.chown(sd, NOBODY, NOBODY)
        refused(
            d,
            f"state_dir {sd} is owned by nobody",
            f"chown root {sd}",
            victim=victim,
            was=VICTIM_TEXT.encode(),
        )

    def test_history_does_not_follow_a_link(self, daemon_factory, tmp_path: Path) -> None:
        """`taskd history` (maybe run by root on any state_dir) refuses a linked database."""
        other = daemon_factory(CONFIG.replace("hello", "secret"), {"echo.py": PLUGIN}, name="o")
        other.start()
        other.wait_for("run", job="secret")
        assert other.stop() == 0
        d = daemon(daemon_factory)
        sd = state_dir(d)
        (sd / "state.db").symlink_to(other.dir / "state" / "state.db")
        out = run_cli("history", "--json", "-c", str(d.config_path))
        assert out.returncode != 0, out.stdout
        assert "symbolic link" in out.stderr and str(sd / "state.db") in out.stderr, out.stderr
        assert "secret" not in out.stdout


class TestModes:
    """Who may write state_dir, and the modes taskd gives what it creates."""

    @pytest.mark.parametrize(("mode", "who"), [(0o770, "group"), (0o757, "others")])
    def test_writable_state_dir_is_refused(self, daemon_factory, mode: int, who: str) -> None:
        d = daemon(daemon_factory)
        sd = state_dir(d, mode)
        refused(d, f"state_dir {sd} is writable by {who}", f"chmod go-w {sd}")
        assert os.listdir(sd) == []

    def test_writable_state_file_is_refused(self, daemon_factory) -> None:
        d = daemon(daemon_factory).start()
        d.wait_for("run", job="hello")
        assert d.stop() == 0
        db = d.dir / "state" / "state.db"
        db.chmod(0o620)
        refused(d, f"{db} is writable by group", f"chmod go-w {db}")

    def test_state_file_of_another_user_is_refused(self, daemon_factory) -> None:
        d = daemon(daemon_factory).start()
        d.wait_for("run", job="hello")
        assert d.stop() == 0
        journal = d.dir / "state" / "ticks.journal"
        os.chown(journal, NOBODY, NOBODY)
        refused(d, f"{journal} is owned by nobody", f"chown root {journal}")

    def test_created_0600_in_a_0700_folder(self, daemon_factory) -> None:
        old = os.umask(0o022)  # the daemon inherits the usual umask: files 0644 by default
        try:
            d = daemon(daemon_factory).start()
        finally:
            os.umask(old)
        d.wait_for("run", job="hello")
        sd = d.dir / "state"
        names = {
            "state.db",
            "state.db-wal",
            "state.db-shm",
            "ticks.journal",
            "ticks.journal.1",
            "taskd.lock",
        }
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in sd.iterdir()}
        assert modes == dict.fromkeys(names, 0o600)
        assert stat.S_IMODE(sd.stat().st_mode) == 0o700
        assert d.stop() == 0

    def test_an_older_0644_database_is_narrowed(self, daemon_factory) -> None:
        d = daemon(daemon_factory).start()
        d.wait_for("run", job="hello")
        assert d.stop() == 0
        db = d.dir / "state" / "state.db"
        db.chmod(0o644)
        d.lines.clear()
        d.start()
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        assert d.events("state_file_mode_narrowed", path=str(db), was="0644", now="0600")
        assert d.stop() == 0


class TestJournalSize:
    """A huge tick journal is replayed a chunk at a time, not read whole."""

    def test_256_mib_journal_starts_in_bounded_memory(self, daemon_factory) -> None:
        d = daemon(daemon_factory)
        sd = state_dir(d)
        journal = sd / "ticks.journal"
        with journal.open("wb") as fh:
            fh.write(b"T\thello\t1700000000.0\n")
            fh.truncate(256 * 1024 * 1024)  # one line of NULs: not ours, skipped
            fh.seek(0, os.SEEK_END)
            fh.write(b"\nT\thello\t1700000001.0\n")
        os.chmod(journal, 0o600)
        d.start(timeout=60)
        peak = peak_rss(d.pid) // 1024
        skipped = d.wait_for("journal_lines_skipped")[0]
        assert skipped["count"] == 1, skipped
        assert d.stop() == 0
        with d.db() as db:
            (tick,) = db.execute("SELECT last_tick FROM jobs WHERE name='hello'").fetchone()
        assert tick == 1700000001.0  # both good lines replayed, around the bad one
        # Read whole, the journal alone would be 256 MiB, twice over once decoded.
        assert peak < 150 * 1024, f"peak RSS {peak} KiB"


def test_check_reports_an_unsafe_state_dir(daemon_factory) -> None:
    """`taskd check` reports a state_dir others can write (the daemon would refuse it)."""
    d = daemon(daemon_factory)
    sd = state_dir(d, 0o777)
    out = run_cli("check", "--json", "-c", str(d.config_path))
    assert out.returncode == 1, out
    errors = json.loads(out.stdout)["errors"]
    assert any(f"chmod go-w {sd}" in e for e in errors), errors


def test_history_reads_a_safe_state_dir(daemon_factory) -> None:
    """The checks leave normal reading alone: history of a stopped daemon's state."""
    d = daemon(daemon_factory).start()
    d.wait_for("run", job="hello")
    assert d.stop() == 0
    out = run_cli("history", "--json", "-c", str(d.config_path))
    assert out.returncode == 0, out.stderr
    assert [r["job"] for r in json.loads(out.stdout)] == ["hello"]
