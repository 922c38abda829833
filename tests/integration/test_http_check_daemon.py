"""http_check in the real daemon against a real aiohttp server on loopback, counting the
connections on the server's side: one session per job reused across runs, its connections
closed when a reload changes or removes the job and when the daemon stops; each URL's outcome
in the shared state on disk; a wrong URL table refused when the config loads."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, DaemonProc, poll, run_cli
from tests.integration.test_control import cli
from tests.integration.test_reload import reload
from tests.loopback_http import LoopbackServer

pytestmark = pytest.mark.timeout(120)

PLUGIN = (REPO / "plugins" / "http_check.py").read_text()

# A second job type, so a reload can remove the http_check job and keep the config valid.
IDLE = """
import taskd

async def idle(ctx) -> None:
    return None

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("idle", idle)]
"""

IDLE_JOB = """
[jobs.idle]
type = "idle"
every = "1h"
"""


def site(server: LoopbackServer, tag: str, every: str = "200ms", urls: int = 3) -> str:
    listed = ", ".join(json.dumps(f"{server.url}/ok?{tag}={i}") for i in range(urls))
    return f"""
[jobs.site]
type = "http_check"
every = "{every}"
timeout = "20s"
[jobs.site.options]
urls = [{listed}]
concurrency = {urls}
headers = {{ X-Tag = "{tag}" }}
{IDLE_JOB}"""


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        yield srv


def shared(d: DaemonProc, key: str) -> Any:
    with contextlib.closing(d.db()) as db:
        try:
            row = db.execute("SELECT value FROM shared WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # not created yet
            return None
    return json.loads(row[0]) if row else None


def succeeded(d: DaemonProc) -> int:
    return len(d.events("run", job="site", outcome="succeeded"))


def test_no_connection_leaks_across_runs_reloads_and_stop(
    daemon_factory: Any, server: LoopbackServer
) -> None:
    d: DaemonProc = daemon_factory(site(server, "a"), {"http_check.py": PLUGIN, "idle.py": IDLE})
    d.start()
    d.wait_for("run", job="site", outcome="succeeded", count=8, timeout=30)
    # 8 runs x 3 URLs over one session: at most 3 connections, kept alive between runs.
    first = server.accepted
    assert 1 <= first <= 3, first
    assert server.open_connections() == first
    counts = {"runs": succeeded(d), "accepted": first, "open": server.open_connections()}

    # A reload that changes the job: the old session closes once its run ends; the new one
    # opens its own connections. No more than one job's worth is ever open afterwards.
    reload(d, site(server, "b"))
    have = succeeded(d)
    d.wait_for("run", job="site", outcome="succeeded", count=have + 5, timeout=30)
    poll(lambda: server.open_connections() <= 3, timeout=10)
    assert server.accepted <= first + 3
    counts["after change"] = server.accepted

    # Unchanged by a reload: the session and its connections stay.
    before = server.accepted
    reload(d, site(server, "b"))
    have = succeeded(d)
    d.wait_for("run", job="site", outcome="succeeded", count=have + 3, timeout=30)
    assert server.accepted == before

    # Removed by a reload: every connection it had is closed.
    reload(d, IDLE_JOB)
    server.wait_open(0, timeout=15)
    counts["after removal, open"] = server.open_connections()

    # Added back, run, then the daemon stops: closed at the stop.
    reload(d, site(server, "c"))
    poll(lambda: server.open_connections() > 0, timeout=15)
    d.wait_for("run", job="site", outcome="succeeded", count=succeeded(d) + 3, timeout=30)
    assert d.stop() == 0
    server.wait_open(0, timeout=10)
    counts["total accepted"] = server.accepted
    counts["total requests"] = len(server.requests)
    # Every request after the first of a session rode a kept-alive connection.
    assert server.accepted <= 9
    print("connection counts:", counts)


def test_outcomes_in_state_and_history(daemon_factory: Any, server: LoopbackServer) -> None:
    config = f"""
[jobs.site]
type = "http_check"
every = "1h"
[jobs.site.options]
urls = ["{server.url}/ok", {{ url = "{server.url}/slow?s=10", timeout = "300ms" }}, "{server.url}/status/503"]
{IDLE_JOB}"""
    d: DaemonProc = daemon_factory(config, {"http_check.py": PLUGIN, "idle.py": IDLE}).start()
    assert cli(d, "trigger", "site", "--wait").returncode == 1
    [run] = d.wait_for("run", job="site", outcome="failed")
    assert "2 of 3 URLs failed" in run["error"]
    assert "timed out after 0.3s" in run["error"] and "status 503, expected 2xx" in run["error"]
    entry = poll(lambda: shared(d, "http_check/site"), timeout=10)
    assert entry[f"{server.url}/ok"]["ok"] is True
    assert entry[f"{server.url}/status/503"]["status"] == 503
    assert entry[f"{server.url}/slow?s=10"]["error"] == "timed out after 0.3s"
    assert d.stop() == 0


def test_a_wrong_url_table_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "plugins.d" / "http_check.py").write_text(PLUGIN)
    config = tmp_path / "taskd.toml"
    config.write_text(
        f"""[daemon]
plugin_dirs = ["plugins.d"]
state_dir = "{tmp_path / "state"}"

[jobs.site]
type = "http_check"
every = "30s"
[jobs.site.options]
urls = ["http://127.0.0.1:1/", {{ url = "http://127.0.0.1:2/", stauts = 204 }}]
"""
    )
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert (
        f"{config}:9: jobs.site.options.urls: item 1: unknown key 'stauts' in a URLCheck table "
        "(did you mean 'status'?)"
    ) in out, out


def test_a_stop_does_not_wait_for_slow_urls_past_the_drain(
    daemon_factory: Any, server: LoopbackServer
) -> None:
    """A run stuck on slow URLs is cancelled at the stop like any io run; its connections go."""
    config = f"""
[jobs.site]
type = "http_check"
every = "1h"
[jobs.site.options]
urls = ["{server.url}/slow?s=60&a", "{server.url}/slow?s=60&b"]
timeout = "120s"
{IDLE_JOB}"""
    d: DaemonProc = daemon_factory(config, {"http_check.py": PLUGIN, "idle.py": IDLE}).start()
    assert cli(d, "trigger", "site").returncode == 0
    poll(lambda: server.inflight == 2, timeout=15)
    started = time.monotonic()
    assert d.stop(timeout=30) == 0  # shutdown_timeout is 5 s in the harness
    assert time.monotonic() - started < 25
    server.wait_open(0, timeout=10)
