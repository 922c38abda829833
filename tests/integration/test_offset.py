"""`offset` for `every` jobs on a real daemon: ticks land at the phase, `taskd next` shows it,
two daemons give a job the same "auto" phase, a reload to a new phase neither loses nor
doubles a tick, and a bad offset is refused with its key path."""

from __future__ import annotations

import itertools
import json
import signal
import time
from datetime import datetime

from taskd.schedule.triggers import stable_offset
from tests.helpers import TICK_PLUGIN, DaemonProc, run_cli

PLUGINS = {"tick.py": TICK_PLUGIN}


def job(name: str, every: str, offset: str) -> str:
    return f'[jobs.{name}]\ntype = "tick"\nevery = "{every}"\noffset = "{offset}"\n'


def phases(rows: list[dict[str, float]], interval: float) -> set[float]:
    """The ticks' phases within the interval, in whole milliseconds."""
    return {round(r["scheduled"] % interval, 3) for r in rows}


def reload(d: DaemonProc, config: str) -> None:
    before = len(d.events("reloaded"))
    d.write_config(config)
    d.signal(signal.SIGHUP)
    d.wait_for("reloaded", count=before + 1, timeout=5)


class TestOffset:
    """Ticks at anchor + offset + k * interval."""

    def test_runs_land_at_the_phase_never_early(self, daemon_factory) -> None:
        d = daemon_factory(job("j", "500ms", "125ms"), PLUGINS).start()
        d.wait_for("run", job="j", outcome="succeeded", count=3, timeout=5)
        assert d.stop() == 0
        rows = d.history("j")
        assert len(rows) >= 3
        assert phases(rows, 0.5) == {0.125}, rows
        assert all(r["started"] >= r["scheduled"] for r in rows), rows

    def test_next_shows_the_offset_ticks(self, daemon_factory) -> None:
        d = daemon_factory(job("j", "10s", "2500ms") + job("auto", "1m", "auto"), PLUGINS)
        text = run_cli("next", "j", "-n", "3", "-c", str(d.config_path))
        assert text.returncode == 0, text.stderr
        assert text.stdout.startswith("j: every 10s offset 2.5s\n"), text.stdout
        out = run_cli("next", "auto", "-n", "3", "--json", "-c", str(d.config_path))
        shown = json.loads(out.stdout)
        phase = stable_offset("auto", 60)
        assert shown["schedule"] == f"every 1m offset {phase:g}s"
        ticks = [datetime.fromisoformat(t).timestamp() for t in shown["next"]]
        assert {round(t % 60, 3) for t in ticks} == {phase}
        assert [round(b - a, 3) for a, b in itertools.pairwise(ticks)] == [60, 60]

    def test_auto_gives_the_same_ticks_on_two_daemons(self, daemon_factory) -> None:
        config = job("fleet-job", "1s", "auto")
        one = daemon_factory(config, PLUGINS, name="one").start()
        two = daemon_factory(config, PLUGINS, name="two").start()
        one.wait_for("run", job="fleet-job", count=3, timeout=6)
        two.wait_for("run", job="fleet-job", count=3, timeout=6)
        assert one.stop() == 0 and two.stop() == 0
        a = {r["scheduled"] for r in one.history("fleet-job")}
        b = {r["scheduled"] for r in two.history("fleet-job")}
        assert len(a & b) >= 2, (a, b)  # the very same floats: identical ticks
        assert phases(one.history("fleet-job"), 1) == {stable_offset("fleet-job", 1)}

    def test_a_reload_to_a_new_phase_loses_and_doubles_nothing(self, daemon_factory) -> None:
        d = daemon_factory(job("j", "500ms", "100ms"), PLUGINS).start()
        d.wait_for("run", job="j", count=2, timeout=5)
        reload(d, job("j", "500ms", "350ms"))
        reloaded = time.time()
        count = len(d.events("run", job="j"))
        d.wait_for("run", job="j", count=count + 3, timeout=5)
        assert d.stop() == 0
        rows = sorted(d.history("j"), key=lambda r: r["scheduled"])
        ticks = [r["scheduled"] for r in rows]
        assert len(ticks) == len(set(ticks)), ticks  # no tick twice
        after = [r for r in rows if r["started"] > reloaded + 0.01]
        assert phases(after, 0.5) == {0.35}, after
        # Nothing lost: no gap between handled ticks longer than one interval and the shift.
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) < 0.5 + 0.25 + 0.01, gaps
        assert d.events("skipped", job="j") == []

    def test_a_bad_offset_is_refused_naming_the_key(self, daemon_factory) -> None:
        d = daemon_factory(job("j", "10s", "10s"), PLUGINS)
        result = run_cli("check", "-c", str(d.config_path))
        assert result.returncode != 0
        assert "jobs.j.offset: must be less than the interval (10s)" in result.stderr, result.stderr
