"""The status page's HTML (taskd.observe.page.render) from a status dict as the ``status``
command answers it: every job and its state, escaping of hostile text, the self-reload and
the absence of anything that could run or write. The page in a real browser is
tests/integration/test_status_page.py."""

from __future__ import annotations

import html
import re
import time
from typing import Any

import pytest

from taskd.observe.page import CSP, render

NOW = time.time()
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
HOSTILE_NAME = '"><script>alert(3)</script>'


def job(name: str, state: str = "idle", **kw: Any) -> dict[str, Any]:
    """A row as JobSet.status() makes it."""
    row: dict[str, Any] = {
        "name": name,
        "type": "echo",
        "kind": "io",
        "schedule": "every 5s",
        "state": state,
        "paused": state == "paused",
        "broken": None,
        "overlap": "skip",
        "running": [],
        "queued": 0,
        "next": NOW + 4,
        "last": None,
        "failures": 0,
    }
    row.update(kw)
    return row


def last(outcome: str, error: str | None = None) -> dict[str, Any]:
    return {
        "run_id": "0001-abc",
        "outcome": outcome,
        "started": NOW - 30,
        "duration": 0.25,
        "error": error,
    }


def status(jobs: list[dict[str, Any]], last_reload: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "daemon": {
            "pid": 4242,
            "version": "1.2.3",
            "python": "3.11.9",
            "loop": "uvloop",
            "started": NOW - 3700,
            "uptime": 3700.0,
            "config": "/etc/taskd/taskd.toml",
            "state_dir": "/var/lib/taskd",
            "socket": "/run/taskd/control.sock",
            "stopping": False,
            "jobs": len(jobs),
            "running": sum(1 for j in jobs if j["state"] == "running"),
            "paused": sum(1 for j in jobs if j["state"] == "paused"),
            "broken": sum(1 for j in jobs if j["state"] == "broken"),
            "retiring": 0,
            "stuck_threads": 0,
            "state_write_failing": False,
            "last_reload": last_reload,
        },
        "jobs": jobs,
    }


RUNNING = [
    {
        "run_id": "0002-def",
        "cause": "schedule",
        "started": NOW - 75,
        "scheduled": NOW - 75,
        "attempt": 2,
        "for": 75.0,
        "in_backoff": False,
    }
]
JOBS = [
    job("backup", "running", running=RUNNING, last=last("succeeded")),
    job("cleanup", "idle", last=last("succeeded")),
    job("report", "idle", last=last("failed", "RuntimeError: disk full"), failures=3),
    job("sync", "paused", next=None, last=last("timed_out", "timed out after 30s"), failures=1),
    job("sqlthing", "broken", broken="plugin sqlthing.py failed to import: ModuleNotFoundError"),
    job("ticker", "crashed", last=last("cancelled", "cancelled")),
]
FAILURES = [
    {
        "job": "report",
        "run_id": f"00{i}-x",
        "outcome": "failed",
        "started": NOW - 600 + i,
        "duration": 0.1,
        "error": f"RuntimeError: disk full #{i}",
    }
    for i in range(3)
]
LAG = {"last": 0.0012, "max": 0.31, "threshold": 0.25}


def rows(page: str) -> dict[str, str]:
    """Each jobs-table row's HTML by job name."""
    found = re.findall(r'<tr class="[a-z-]*" id="job-([^"]+)">(.*?)</tr>', page, re.S)
    return {html.unescape(name): body for name, body in found}


class TestDocument:
    """A whole, self-contained, read-only HTML5 document."""

    def test_shape(self) -> None:
        page = render(now=NOW, status=status(JOBS), failures=FAILURES, lag=LAG)
        assert page.startswith("<!DOCTYPE html>")
        assert page.rstrip().endswith("</html>")
        assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in page
        assert CSP == "default-src 'none'; style-src 'unsafe-inline'"

    def test_refreshes_itself(self) -> None:
        assert '<meta http-equiv="refresh" content="5">' in render(
            now=NOW, status=status(JOBS), failures=[], lag=LAG
        )
        page = render(now=NOW, status=status(JOBS), failures=[], lag=LAG, refresh=2.5)
        assert '<meta http-equiv="refresh" content="2.5">' in page
        assert '<a href="">Reload now</a>' in page

    @pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
    def test_bad_refresh(self, bad: float) -> None:
        with pytest.raises(ValueError, match="refresh"):
            render(now=NOW, status=status(JOBS), failures=[], lag=LAG, refresh=bad)

    def test_nothing_runs_loads_or_writes(self) -> None:
        page = render(now=NOW, status=status(JOBS), failures=FAILURES, lag=LAG).lower()
        for forbidden in ("<script", "<form", "<input", "<button", "<link", "<img", "src=", "://"):
            assert forbidden not in page, forbidden
        assert 'method="post"' not in page

    def test_header(self) -> None:
        reload_ = {
            "ok": True,
            "at": NOW - 90,
            "took": 0.042,
            "added": ["new"],
            "changed": [],
            "removed": ["old", "older"],
            "errors": [],
            "warnings": [],
        }
        page = render(now=NOW, status=status(JOBS, reload_), failures=[], lag=LAG)
        assert "<h1>taskd 1.2.3</h1>" in page
        assert "pid 4242" in page and "up 1h 01m" in page and "loop uvloop" in page
        assert "/etc/taskd/taskd.toml" in page
        assert "ok</span> 1m 30s ago" in page and "1 added, 0 changed, 2 removed" in page
        assert "last 1ms · max 310ms" in page and "threshold 250ms" in page
        assert "was blocked" in page  # the max went over the threshold, the last did not
        assert "Generated " in page

    def test_failed_reload(self) -> None:
        reload_ = {"ok": False, "at": NOW - 5, "took": 0.01, "errors": ["jobs.x: bad cron"]}
        page = render(now=NOW, status=status(JOBS, reload_), failures=[], lag={})
        assert "failed</span> 5s ago" in page and "jobs.x: bad cron" in page
        assert "last reload failed" in page  # the headline says so too
        assert "last - · max -" in page  # no lag measured yet

    def test_no_reload_yet(self) -> None:
        assert "none since start" in render(now=NOW, status=status(JOBS), failures=[], lag=LAG)


class TestJobs:
    """Every job is a row with its state, schedule, last outcome, next run and streak."""

    def test_every_row(self) -> None:
        found = rows(render(now=NOW, status=status(JOBS), failures=[], lag=LAG))
        assert list(found) == [j["name"] for j in JOBS]
        for j in JOBS:
            assert f">{j['state']}</span>" in found[j["name"]], j["name"]
            if j["last"] is not None:
                outcome = j["last"]["outcome"].replace("_", " ")
                assert f">{outcome}</span>" in found[j["name"]], j["name"]
                assert ">30s ago</span>" in found[j["name"]], j["name"]

    def test_details(self) -> None:
        found = rows(render(now=NOW, status=status(JOBS), failures=[], lag=LAG))
        assert "for 1m 15s (schedule, attempt 2)" in found["backup"]
        assert "every 5s" in found["cleanup"] and "in 4s" in found["cleanup"]
        assert "RuntimeError: disk full" in found["report"]
        assert '<span class="b bad">3</span>' in found["report"]
        assert "timed out after 30s" in found["sync"]
        assert "ModuleNotFoundError" in found["sqlthing"] and "never run" in found["sqlthing"]
        assert "restart taskd" in found["ticker"]

    def test_no_jobs(self) -> None:
        assert "No jobs configured." in render(now=NOW, status=status([]), failures=[], lag=LAG)

    def test_long_error_cut_in_table(self) -> None:
        long = "E" * 10_000
        found = rows(
            render(
                now=NOW, status=status([job("x", last=last("failed", long))]), failures=[], lag={}
            )
        )
        assert "E" * 199 + "…" in found["x"] and "E" * 4001 not in found["x"]


class TestFailures:
    """Recent failures, newest first."""

    def test_newest_first(self) -> None:
        page = render(now=NOW, status=status(JOBS), failures=FAILURES, lag=LAG)
        section = page[page.index('id="failures"') :]
        order = [section.index(f"disk full #{i}") for i in (2, 1, 0)]
        assert order == sorted(order)
        assert "Recent failures (3)" in page

    def test_none(self) -> None:
        assert "No failed runs" in render(now=NOW, status=status(JOBS), failures=[], lag=LAG)


class TestEscaping:
    """Whatever a job, plugin or config produced reaches the page as text only."""

    def test_hostile_everywhere(self) -> None:
        hostile_jobs = [
            job(
                HOSTILE_NAME,
                schedule=HOSTILE,
                broken=HOSTILE,
                state="broken",
                type=HOSTILE,
                last=last("failed", HOSTILE),
            ),
            job("plain", last=last("failed", HOSTILE), running=[{**RUNNING[0], "cause": HOSTILE}]),
        ]
        st = status(
            hostile_jobs, {"ok": False, "at": NOW, "errors": [HOSTILE], "warnings": [HOSTILE]}
        )
        st["daemon"]["config"] = HOSTILE
        st["daemon"]["version"] = HOSTILE
        failures = [{**FAILURES[0], "job": HOSTILE_NAME, "error": HOSTILE, "run_id": HOSTILE}]
        page = render(st, failures=failures, lag=LAG)
        assert "<script" not in page and "<img" not in page
        assert "onerror=alert" in page  # as text, inside escaped markup
        escaped = html.escape(HOSTILE, quote=True)
        assert page.count(escaped) >= 8
        assert html.escape(HOSTILE_NAME, quote=True) in page
        assert list(rows(page)) == [HOSTILE_NAME, "plain"]

    def test_quote_in_attribute(self) -> None:
        # The name lands in an id attribute: its quote must not close it.
        page = render(now=NOW, status=status([job(HOSTILE_NAME)]), failures=[], lag={})
        assert 'id="job-&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;"' in page


class TestTiming:
    """1,000 jobs render fast enough for a page that reloads every few seconds."""

    def test_thousand_jobs(self) -> None:
        states = ["idle", "running", "paused", "broken", "crashed", "idle"]
        many = [
            job(
                f"job-{i:04d}",
                states[i % len(states)],
                running=RUNNING if i % 6 == 1 else [],
                broken="plugin failed" if i % 6 == 3 else None,
                last=last("failed", "RuntimeError: " + "x" * 80)
                if i % 4 == 0
                else last("succeeded"),
                failures=i % 3,
            )
            for i in range(1000)
        ]
        st = status(many)
        failures = FAILURES * 17  # the daemon keeps 50
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            page = render(st, failures=failures, lag=LAG)
            times.append(time.perf_counter() - t0)
        assert len(rows(page)) == 1000
        times.sort()
        print(
            f"\nrender 1000 jobs: best {times[0] * 1e3:.1f} ms, median {times[5] * 1e3:.1f} ms, "
            f"{len(page) / 1024:.0f} KiB"
        )
