"""History retention through the real daemon: exactly the newest ``history_max_runs`` runs
are kept (each run used two AUTOINCREMENT numbers, and pruning by number kept about half),
and with ``history_max_age`` runs that started longer ago go."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from tests.helpers import TICK_PLUGIN, DaemonProc, daemon_table, poll

pytestmark = pytest.mark.timeout(180)

PLUGINS = {"st.py": TICK_PLUGIN}
ONE_JOB = '[jobs.fast]\ntype = "tick"\nevery = "20ms"\n'
JOBS = '[jobs.fast]\ntype = "tick"\nevery = "20ms"\n[jobs.other]\ntype = "tick"\nevery = "30ms"\n'


def stored(d: DaemonProc) -> list[tuple[str, float]]:
    """(run_id, started) of every history row, oldest first."""
    with contextlib.closing(d.db()) as db:
        return list(db.execute("SELECT run_id, started FROM runs ORDER BY seq"))


class TestMaxRuns:
    """The newest N runs by start, no more and no fewer."""

    def test_exactly_the_newest_are_kept(self, daemon_factory) -> None:
        keep = 25
        config = daemon_table(history_max_runs=str(keep)) + ONE_JOB
        d = daemon_factory(config, PLUGINS).start()
        d.wait_for("run", count=4 * keep, timeout=60)
        assert d.stop() == 0
        # One job that never overlaps itself: its runs start, and are logged, in order.
        logged = [r["run_id"] for r in d.events("run")]
        assert len(logged) >= 4 * keep
        assert [run_id for run_id, _ in stored(d)] == logged[-keep:]
        # After a restart too (the count is taken from the file, not assumed).
        again = daemon_factory(config, PLUGINS, name="d").start()
        again.wait_for("run", count=3, timeout=30)
        assert again.stop() == 0
        logged += [r["run_id"] for r in again.events("run")]
        assert [run_id for run_id, _ in stored(again)] == logged[-keep:]


class TestMaxAge:
    """Runs that started longer ago than history_max_age go, at start and while running."""

    def test_old_rows_go(self, daemon_factory) -> None:
        d = daemon_factory(daemon_table() + JOBS, PLUGINS).start()
        d.wait_for("run", count=20, timeout=30)
        assert d.stop() == 0
        rows = stored(d)
        old = [run_id for run_id, _ in rows[: len(rows) // 2]]
        with contextlib.closing(sqlite3.connect(d.dir / "state" / "state.db")) as db:
            db.executemany(
                "UPDATE runs SET started = started - 3 * 86400 WHERE run_id = ?",
                [(r,) for r in old],
            )
            db.commit()
        again = daemon_factory(daemon_table(history_max_age='"2d"') + JOBS, PLUGINS, name="d")
        again.start()
        again.wait_for("run", count=len(again.events("run")) + 3, timeout=30)
        left = {run_id for run_id, _ in stored(again)}
        assert not left & set(old)
        assert {run_id for run_id, _ in rows[len(rows) // 2 :]} <= left
        assert again.stop() == 0

    def test_rows_age_out_while_running(self, daemon_factory) -> None:
        d = daemon_factory(daemon_table(history_max_age='"2s"') + JOBS, PLUGINS).start()
        d.wait_for("run", count=10, timeout=30)
        first = stored(d)[0][0]
        # Some commit after that run is 2 s old deletes it; nothing younger than 2 s goes.
        poll(lambda: first not in {r for r, _ in stored(d)}, timeout=20)
        rows = stored(d)
        assert rows and min(s for _, s in rows) > time.time() - 2 - 1.0
        assert d.stop() == 0


class TestConfig:
    """The two keys are checked strictly, with the fix in the message."""

    @pytest.mark.parametrize(
        ("line", "said"),
        [
            ("history_max_runs = 0", "from 1 to"),
            ('history_max_runs = "100"', "whole number"),
            ('history_max_age = "0s"', 'at least "1s"'),
            ('history_max_age = "30 days"', "duration"),
        ],
    )
    def test_bad_values(self, tmp_path: Path, line: str, said: str) -> None:
        from taskd.config.load import load_config
        from taskd.errors import ConfigError

        path = tmp_path / "taskd.toml"
        path.write_text(f"[daemon]\n{line}\n")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        text = str(err.value)
        assert f"{path}:2" in text and line.split()[0] in text and said in text, text
