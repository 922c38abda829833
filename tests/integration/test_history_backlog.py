"""A big history excess through the real daemon: 400,000 rows past a lowered
``history_max_runs`` or a new ``history_max_age`` go in short passes, so the loop is never
held (deleting them at once held it 0.2-0.7 s here, and 1.5 s for a million rows), no tick is
skipped, the start does not wait for them, and the limit is exact once they are gone."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time

import pytest

from tests.helpers import TICK_PLUGIN, DaemonProc, daemon_table, poll

pytestmark = pytest.mark.timeout(300)

PLUGINS = {"st.py": TICK_PLUGIN}
JOB = '[jobs.fast]\ntype = "tick"\nevery = "200ms"\n'
EXCESS = 400_000
KEEP = 10
DAY = 86_400.0


def config(**daemon: str) -> str:
    # 100 ms: a pass holds the loop a few ms; deleting the excess at once held it 0.2 s (by
    # age: one range delete on the index) to 0.7 s (by count).
    return daemon_table(loop_block_threshold='"100ms"', **daemon) + JOB


def prefill(d: DaemonProc, age: float) -> None:
    """EXCESS rows in d's state.db (made by a first start), the newest ``age`` seconds old."""
    d.start()
    assert d.stop() == 0
    now = time.time() - age
    with contextlib.closing(sqlite3.connect(d.dir / "state" / "state.db")) as db:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO runs (run_id, job, scheduled, started, attempts, duration, outcome, "
            "trigger, result) VALUES (?, 'old', ?, ?, 1, 0.01, 'succeeded', 'schedule', '1')",
            ((f"old{i:07d}", now - EXCESS + i, now - EXCESS + i) for i in range(EXCESS)),
        )
        db.execute("COMMIT")


def count(d: DaemonProc, where: str = "") -> int:
    with contextlib.closing(d.db()) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM runs {where}").fetchone()[0])


def assert_loop_free(d: DaemonProc) -> None:
    """No pruning held the loop past the threshold, and no tick was skipped."""
    held = [
        line
        for line in d.events("loop_blocked")
        if "taskd/state/" in f"{line.get('frame')} {line.get('stack')}"
    ]
    assert not held, held
    assert not d.events("skipped"), d.events("skipped")


def assert_newest_kept(d: DaemonProc, before: int) -> None:
    """Exactly the newest KEEP runs, the ones the daemon logged last (``before``: runs
    logged by the first start, the one that made the file)."""
    d.wait_for("run", count=max(len(d.events("run")), before + KEEP) + 3, timeout=30)
    assert d.stop() == 0
    logged = [r["run_id"] for r in d.events("run")]
    assert [r["run_id"] for r in d.history()] == logged[-KEEP:]


class TestBacklog:
    """Rows past the limits go a few ms at a time, between the loop's other work."""

    def test_lowered_max_runs_by_reload(self, daemon_factory) -> None:
        d = daemon_factory(config(history_max_runs="1000000"), PLUGINS)
        prefill(d, age=60)
        before = len(d.events("run"))
        d.start(wait=False)
        d.wait_for("started", count=2, timeout=30)
        d.wait_for("run", count=before + 3, timeout=30)
        d.write_config(config(history_max_runs=str(KEEP)))
        d.signal(signal.SIGHUP)
        d.wait_for("reloaded", timeout=30)
        poll(lambda: count(d) == KEEP, timeout=180, interval=0.2)
        assert_loop_free(d)
        assert d.wait_for("history_pruned", timeout=10)[-1]["runs"] == KEEP
        assert_newest_kept(d, before)

    def test_new_max_age_by_reload(self, daemon_factory) -> None:
        d = daemon_factory(config(), PLUGINS)
        prefill(d, age=2 * DAY)
        d.start(wait=False)
        d.wait_for("started", count=2, timeout=30)
        d.write_config(config(history_max_age='"1d"'))
        d.signal(signal.SIGHUP)
        d.wait_for("reloaded", timeout=30)
        poll(lambda: count(d, "WHERE job = 'old'") == 0, timeout=180, interval=0.2)
        assert_loop_free(d)
        assert d.stop() == 0
        # None of the daemon's own runs went: they are minutes old, not days.
        assert len(d.history("fast")) == len(d.events("run"))

    def test_excess_at_start(self, daemon_factory) -> None:
        d = daemon_factory(config(history_max_runs="1000000"), PLUGINS)
        prefill(d, age=60)
        d.write_config(config(history_max_runs=str(KEEP)))
        before = len(d.events("run"))
        d.start(wait=False)
        d.wait_for("started", count=2, timeout=30)  # the first start's line is in d.lines too
        # READY did not wait for the excess: most of it is still there once started.
        assert count(d) > EXCESS // 2
        poll(lambda: count(d) == KEEP, timeout=180, interval=0.2)
        assert_loop_free(d)
        assert_newest_kept(d, before)
