"""The status page in a real headless Chromium: the DOM it builds (jobs, outcomes, the paused
state, a hostile error shown as text and never run) and a screenshot kept as a test artifact.

Two ways in: the page rendered by this module and served from a tiny local HTTP server (the
page alone, and its Content-Security-Policy stopping a script that slipped through), then the
page as a real daemon serves it on ``metrics_address``. Chromium comes from Debian (.ci/run
installs it); without it the tests skip on a developer machine and fail under CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from taskd.observe.page import render
from tests.helpers import DaemonProc, daemon_table, free_port, listening, poll, run_cli

HOSTILE = "<script>document.title='pwned'</script><b>bold</b>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A blank 1280x900 PNG is a few KB; a page of text and tables is tens of KB.
MIN_SCREENSHOT = 20_000
BROWSER_TIMEOUT = 30.0  # seconds for one Chromium run, start to exit


def _skip_or_fail(reason: str) -> None:
    """Skip on a developer machine without Chromium; under CI fail, so that a green CI
    always means the page was checked in a browser."""
    if os.environ.get("CI"):
        pytest.fail(f"the status page browser tests cannot run here: {reason}")
    pytest.skip(reason)


@pytest.fixture
def chromium(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``chromium(url, *flags)``: one headless Chromium run with a throw-away profile."""
    exe = shutil.which("chromium")
    if exe is None:
        _skip_or_fail("chromium is not installed (apt-get install chromium, as .ci/run does)")
    assert exe is not None
    runs = iter(range(1000))

    def run(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
        profile = tmp_path / f"chromium-profile-{next(runs)}"
        # --no-sandbox: Chromium refuses to start as root with its sandbox, and CI is root.
        cmd = [
            exe,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
            "--no-first-run",
            f"--user-data-dir={profile}",
            *flags,
            url,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT)
        assert result.returncode == 0, f"chromium exited {result.returncode}:\n{result.stderr}"
        return result

    return run


class Dom(HTMLParser):
    """What a dumped DOM holds: its elements, title, text, and each job row's text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.title = ""
        self.text: list[str] = []
        self.rows: dict[str, str] = {}
        self._in_title = False
        self._row: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_title = tag == "title"
        row_id = dict(attrs).get("id") or ""
        if tag == "tr" and row_id.startswith("job-"):
            self._row = row_id[4:]
            self.rows[self._row] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_title:
            self.title += data
        if self._row is not None:
            self.rows[self._row] += data + " "

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def dump_dom(chromium: Callable[..., Any], url: str) -> Dom:
    return Dom(chromium(url, "--dump-dom").stdout)


def screenshot(chromium: Callable[..., Any], url: str, path: Path) -> Path:
    """Save a 1280x900 screenshot of ``url`` to ``path``, and to $TASKD_ARTIFACTS when set."""
    chromium(url, f"--screenshot={path}", "--window-size=1280,900", "--hide-scrollbars")
    data = path.read_bytes() if path.exists() else b""
    assert data.startswith(PNG_MAGIC), f"no PNG at {path}"
    assert len(data) > MIN_SCREENSHOT, f"{path} is {len(data)} bytes: a blank page?"
    artifacts = os.environ.get("TASKD_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)
    return path


def assert_hostile_is_text(dom: Dom) -> None:
    """The hostile error is on the page as text, and nothing of it became an element."""
    assert HOSTILE in dom.all_text
    assert "script" not in dom.tags, "an injected <script> element is in the DOM"
    assert "b" not in dom.tags, "an injected <b> element is in the DOM"  # the page uses none
    assert "pwned" not in dom.title


# -- the page alone ----------------------------------------------------------------------------


def page_status() -> dict[str, Any]:
    """A small daemon's status: one job of each kind the daemon test has, plus a broken one."""
    now = time.time()

    def row(name: str, state: str, last: dict[str, Any] | None, **kw: Any) -> dict[str, Any]:
        return {
            "name": name,
            "type": "demo",
            "kind": "io",
            "schedule": "every 1s",
            "state": state,
            "broken": None,
            "running": [],
            "queued": 0,
            "next": now + 1,
            "last": last,
            "failures": 0,
            **kw,
        }

    def last(outcome: str, error: str | None = None) -> dict[str, Any]:
        return {
            "run_id": "0001-ab",
            "outcome": outcome,
            "started": now - 2,
            "duration": 0.003,
            "error": error,
        }

    running = [
        {"run_id": "0002-cd", "cause": "schedule", "started": now - 12, "for": 12.0, "attempt": 1}
    ]
    return {
        "daemon": {
            "pid": os.getpid(),
            "version": "0.0-test",
            "loop": "uvloop",
            "started": now - 4000,
            "uptime": 4000.0,
            "config": "/etc/taskd/taskd.toml",
            "jobs": 5,
            "running": 1,
            "paused": 1,
            "broken": 1,
            "stuck_threads": 0,
            "last_reload": {"ok": False, "at": now - 60, "took": 0.02, "errors": [HOSTILE]},
        },
        "jobs": [
            row("bad", "idle", last("failed", HOSTILE), failures=4),
            row("good", "idle", last("succeeded")),
            row("parked", "paused", None, next=None),
            row("plugin", "broken", None, broken="plugin demo.py failed to import"),
            row("slow", "running", last("succeeded"), running=running),
        ],
    }


@contextlib.contextmanager
def serve(pages: dict[str, str]) -> Iterator[str]:
    """Serve ``pages`` (path -> HTML) on 127.0.0.1; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path)
            if body is None:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # not the test's output

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class TestPageInBrowser:
    """The rendered page, served locally, as Chromium builds it."""

    def test_dom_and_screenshot(self, chromium: Callable[..., Any], tmp_path: Path) -> None:
        failures = [
            {
                "job": "bad",
                "run_id": f"000{i}-ab",
                "outcome": "failed",
                "started": time.time() - i,
                "duration": 0.003,
                "error": HOSTILE,
            }
            for i in range(3)
        ]
        lag = {"last": 0.0008, "max": 0.012, "threshold": 0.25}
        with serve({"/": render(page_status(), failures=failures, lag=lag)}) as base:
            dom = dump_dom(chromium, base + "/")
            shot = screenshot(chromium, base + "/", tmp_path / "status-page-local.png")
        assert set(dom.rows) == {"bad", "good", "parked", "plugin", "slow"}
        assert "failed" in dom.rows["bad"] and HOSTILE in dom.rows["bad"]
        assert "succeeded" in dom.rows["good"]
        assert "paused" in dom.rows["parked"]
        assert "broken" in dom.rows["plugin"] and "failed to import" in dom.rows["plugin"]
        assert "running" in dom.rows["slow"] and "for 12s" in dom.rows["slow"]
        assert "Reload now" in dom.all_text
        assert_hostile_is_text(dom)
        print(f"\nscreenshot: {shot}")

    def test_csp_stops_a_missed_escape(self, chromium: Callable[..., Any]) -> None:
        # Defence in depth: were an escape ever missed, the page's policy still forbids script.
        page = render(page_status(), failures=[], lag={})
        leaked = page.replace("</h1>", "</h1><script>document.title='pwned'</script>", 1)
        assert "<script>" in leaked
        with serve({"/": leaked}) as base:
            dom = dump_dom(chromium, base + "/")
        assert "script" in dom.tags  # the element is there: only the policy stops it
        assert dom.title.startswith("taskd ") and "pwned" not in dom.title


# -- the page a daemon serves ------------------------------------------------------------------

PLUGIN = """
import taskd


async def ok(ctx) -> dict:
    return {"ok": True}


async def boom(ctx, msg: str) -> None:
    raise RuntimeError(msg)


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("ok", ok, kind="io"), taskd.JobType("boom", boom, kind="io")]
"""

JOBS = f"""
[jobs.good]
type = "ok"
every = "1s"

[jobs.bad]
type = "boom"
every = "1s"
[jobs.bad.options]
msg = "{HOSTILE}"

[jobs.parked]
type = "ok"
every = "1h"
"""


class TestDaemonPage:
    """The page at ``/`` on a running daemon's metrics_address."""

    def test_jobs_outcomes_paused_and_hostile_error(
        self,
        daemon_factory: Callable[..., DaemonProc],
        chromium: Callable[..., Any],
        tmp_path: Path,
    ) -> None:
        port = free_port()
        config = daemon_table(metrics_address=f'"127.0.0.1:{port}"') + JOBS
        d = daemon_factory(config, {"page.py": PLUGIN}).start()
        d.wait_for("run", job="good", outcome="succeeded", timeout=5)
        d.wait_for("run", job="bad", outcome="failed", timeout=5)
        paused = run_cli("pause", "parked", "-c", str(d.config_path), timeout=30)
        assert paused.returncode == 0, paused.stderr
        poll(lambda: listening(port), timeout=5)
        url = f"http://127.0.0.1:{port}/"

        dom = dump_dom(chromium, url)
        assert {"good", "bad", "parked"} <= set(dom.rows), sorted(dom.rows)
        assert "succeeded" in dom.rows["good"]
        assert "failed" in dom.rows["bad"] and HOSTILE in dom.rows["bad"]
        assert "paused" in dom.rows["parked"]
        assert f"pid {d.pid}" in dom.all_text
        assert_hostile_is_text(dom)
        shot = screenshot(chromium, url, tmp_path / "status-page-daemon.png")
        print(f"\nscreenshot: {shot}")
