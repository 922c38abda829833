"""/metrics, /healthz and the bind failure, on a real daemon: scraped with prometheus_client's
parser after known runs, skips, retries and a worker crash."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import daemon_table, free_port, listening, poll, run_cli

PLUGIN = """
import asyncio
import os

import taskd


async def ok(ctx) -> dict:
    return {"fine": True}


async def flaky(ctx) -> None:
    raise RuntimeError("always fails")


async def slow(ctx) -> None:
    await asyncio.sleep(0.5)


def crash() -> None:
    os._exit(7)


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("ok", ok),
        taskd.JobType("flaky", flaky),
        taskd.JobType("slow", slow),
        taskd.JobType("crash", crash, kind="cpu"),
    ]
"""

JOBS = """
[jobs.ok]
type = "ok"
every = "200ms"

[jobs.flaky]
type = "flaky"
every = "1h"
retries = 1
retry_backoff = "50ms"

[jobs.slow]
type = "slow"
every = "200ms"

[jobs.crash]
type = "crash"
every = "1h"
"""


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def config(port: int) -> str:
    return daemon_table(metrics_address=f'"127.0.0.1:{port}"') + JOBS


class TestScrape:
    """Known runs, skips, retries and a worker crash show in the families."""

    def test_families_after_known_events(self, daemon_factory) -> None:
        port = free_port()
        d = daemon_factory(config(port), {"m.py": PLUGIN}).start()
        poll(lambda: listening(port))
        for job in ("flaky", "crash"):
            run_cli("trigger", job, "--wait", "-c", str(d.config_path), timeout=30)
        d.wait_for("run", job="ok", count=3, timeout=5)
        d.wait_for("skipped", job="slow", reason="overlap", timeout=5)
        samples = poll(lambda: (s := scrape(port)) and s, timeout=5)
        ok_runs = value(samples, "taskd_runs_total", job_name="ok", outcome="succeeded")
        assert ok_runs >= 3
        assert value(samples, "taskd_runs_total", job_name="flaky", outcome="failed") == 1
        assert value(samples, "taskd_retries_total", job_name="flaky") == 1
        assert value(samples, "taskd_runs_total", job_name="crash", outcome="failed") == 1
        assert value(samples, "taskd_worker_restarts_total", cause="died") == 1
        assert value(samples, "taskd_skips_total", job_name="slow", reason="overlap") >= 1
        count = value(samples, "taskd_run_duration_seconds_count", job_name="ok")
        assert count >= 3
        assert (
            value(samples, "taskd_run_duration_seconds_bucket", job_name="ok", le="+Inf") == count
        )
        assert value(samples, "taskd_job_last_success_timestamp_seconds", job_name="ok") > 0
        assert value(samples, "taskd_job_next_run_timestamp_seconds", job_name="flaky") > 0
        assert value(samples, "taskd_build_info", **_build_labels(samples)) == 1
        assert value(samples, "taskd_process_resident_memory_bytes", process="daemon") > 1e6
        assert value(samples, "taskd_reload_last_success") == 1

    def test_healthz_and_a_failed_reload(self, daemon_factory) -> None:
        port = free_port()
        d = daemon_factory(config(port), {"m.py": PLUGIN}).start()
        poll(lambda: listening(port))
        status, body = get(port, "/healthz")
        assert status == 200 and body["ok"] is True, body
        d.write_config(config(port).replace('every = "200ms"', 'evry = "200ms"', 1))
        assert run_cli("reload", "-c", str(d.config_path)).returncode == 1
        status, body = get(port, "/healthz")
        assert status == 503, body
        assert "reload_failed" in json.dumps(body["problems"]), body
        samples = scrape(port)
        assert value(samples, "taskd_reload_last_success") == 0


class TestBindFailure:
    """An address already in use: the daemon refuses to start, saying which and why."""

    def test_address_in_use(self, daemon_factory) -> None:
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            d = daemon_factory(config(port), {"m.py": PLUGIN}).start(wait=False)
            assert d.wait_exit(timeout=20) == 3
        line = d.wait_for("cannot_start")[0]
        assert f"127.0.0.1:{port}" in line["error"], line
        assert d.events("started") == []


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _build_labels(samples: dict[Any, float]) -> dict[str, str]:
    key = next(labels for name, labels in samples if name == "taskd_build_info")
    return dict(key)
