"""Skips on a real daemon: a job that keeps skipping logs its first skip at once and the rest
added up (at most a line a minute, and at a pause or stop), never one line per tick; its
counters (metrics) are exact meanwhile, and after a stop every tick is a run or logged."""

from __future__ import annotations

import urllib.request
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import daemon_table, free_port, listening, poll, run_cli

PLUGIN = """
import asyncio

import taskd


async def nap(ctx, seconds: float = 0.0) -> None:
    await asyncio.sleep(seconds)


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("nap", nap)]
"""

# A run of 1 s every 100 ms: each run skips ~9 ticks (overlap = "skip", the default).
SLOW = """
[jobs.slow]
type = "nap"
every = "100ms"
[jobs.slow.options]
seconds = 1.0
"""
INTERVAL = 0.1


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def skips_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "taskd_skips_total" and sample.labels == {
                "job_name": "slow",
                "reason": "overlap",
            }:
                return sample.value
    return 0.0


class TestSkipSpans:
    """Skip lines per span, counts exact in the log and in the metrics."""

    def test_the_rest_of_a_span_is_one_line_and_metrics_stay_exact(self, daemon_factory) -> None:
        port = free_port()
        d = daemon_factory(
            daemon_table(metrics_address=f'"127.0.0.1:{port}"') + SLOW, {"p.py": PLUGIN}
        ).start()
        poll(lambda: listening(port))
        d.wait_for("run", job="slow", outcome="succeeded", count=3, timeout=10)
        # Mid-span the metrics already count every skipped tick the log has not yet shown.
        mid = skips_total(port)
        logged_mid = sum(e["count"] for e in d.events("skipped", job="slow", reason="overlap"))
        assert mid >= logged_mid
        # A pause ends the span: its skips are logged at once, and no tick is handled after.
        assert run_cli("pause", "slow", "-c", str(d.config_path)).returncode == 0
        d.wait_for("paused", job="slow", timeout=5)
        lines = poll(
            lambda: (
                (ls := d.events("skipped", job="slow", reason="overlap"))
                and sum(e["count"] for e in ls) == skips_total(port)
                and ls
            ),
            timeout=5,
        )
        total = sum(e["count"] for e in lines)
        assert total >= 2 * 8, lines  # ~9 skipped ticks behind each of the runs so far
        # The first skip at once; every later one (well within a minute) in the one line the
        # pause wrote, whatever runs came between.
        assert len(lines) == 2, lines
        assert lines[0]["count"] == 1 and lines[1]["count"] == total - 1, lines
        assert d.stop() == 0

    def test_every_tick_is_a_run_or_counted_in_the_log_after_a_stop(self, daemon_factory) -> None:
        d = daemon_factory(SLOW, {"p.py": PLUGIN}).start()
        d.wait_for("run", job="slow", outcome="succeeded", count=2, timeout=10)
        assert d.stop() == 0  # mid-span: the stop logs what the span added up
        skipped = d.events("skipped", job="slow")
        assert {e["reason"] for e in skipped} == {"overlap"}, skipped
        runs = d.history("slow")
        ticks = [r["scheduled"] for r in runs]
        ticks += [epoch(e.get("last", e["first"])) for e in skipped]
        first, last = min(ticks), max(ticks)
        handled = len(runs) + sum(e["count"] for e in skipped)
        assert handled == round((last - first) / INTERVAL) + 1, (runs, skipped)
        assert len(skipped) < sum(e["count"] for e in skipped), skipped
