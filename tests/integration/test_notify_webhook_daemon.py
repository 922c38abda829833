"""notify_webhook in the real daemon, POSTing to a real aiohttp server on loopback: a final
failure sent once however often it repeats, the recovery, a time-out; a hung webhook delays
neither the runs nor the stop; a wrong variable is reported by `taskd check`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, DaemonProc, run_cli
from tests.integration.test_control import cli
from tests.loopback_http import LoopbackServer

pytestmark = pytest.mark.timeout(120)

NOTIFY = (REPO / "plugins" / "notify_webhook.py").read_text()

FLAKY = """
import asyncio
import os

import taskd


async def flaky(ctx, flag: str, sleep: float = 0.0) -> str:
    await asyncio.sleep(sleep)
    if os.path.exists(flag):
        raise RuntimeError("boom: " + flag)
    return "fine"


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("flaky", flaky)]
"""


def config(flag: Path) -> str:
    return f"""
[jobs.backup]
type = "flaky"
every = "200ms"
retries = 1
retry_backoff = "20ms"
[jobs.backup.options]
flag = "{flag}"

[jobs.slow]
type = "flaky"
every = "1h"
timeout = "200ms"
[jobs.slow.options]
flag = "{flag}.none"
sleep = 30.0
"""


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        yield srv


def start(daemon_factory: Any, flag: Path, **env: str) -> DaemonProc:
    d: DaemonProc = daemon_factory(
        config(flag), {"notify_webhook.py": NOTIFY, "flaky.py": FLAKY}, env=env
    )
    return d.start()


def test_failure_sent_once_then_recovery_and_timeout(
    daemon_factory: Any, server: LoopbackServer, tmp_path: Path
) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    d = start(
        daemon_factory,
        flag,
        TASKD_WEBHOOK_URL=server.url + "/hook",
        TASKD_WEBHOOK_MIN_INTERVAL="0",
    )
    d.wait_for("webhook_on")
    d.wait_for("run", job="backup", outcome="failed", count=6, timeout=30)
    [failed] = server.received()  # six final failures, one POST: the rest are repeats
    assert failed["event"] == "failed" and failed["job"] == "backup"
    assert failed["attempt"] == 2  # after its retry, not at the retried attempt
    assert failed["error"] == f"RuntimeError: boom: {flag}"
    assert failed["text"].endswith(f"job backup failed: RuntimeError: boom: {flag}")

    flag.unlink()
    recovered = server.wait_hooks(2, timeout=15)[1]
    assert recovered["event"] == "recovered" and recovered["job"] == "backup"
    assert recovered["failures"] >= 6

    assert cli(d, "trigger", "slow").returncode == 0
    timed_out = server.wait_hooks(3, timeout=15)[2]
    assert timed_out["event"] == "timed_out" and timed_out["job"] == "slow"
    assert d.stop() == 0
    assert len(server.received()) == 3


def test_a_hung_webhook_delays_neither_runs_nor_the_stop(
    daemon_factory: Any, server: LoopbackServer, tmp_path: Path
) -> None:
    server.hook_delay = 120  # never answers in time
    flag = tmp_path / "broken"
    flag.touch()
    d = start(
        daemon_factory,
        flag,
        TASKD_WEBHOOK_URL=server.url + "/hook",
        TASKD_WEBHOOK_TIMEOUT="60s",
        TASKD_WEBHOOK_MIN_INTERVAL="0",
        TASKD_WEBHOOK_REPEAT="0",  # every failure is POSTed, and every POST hangs
    )
    server.wait_hooks(3, timeout=30)
    # Runs keep their 200 ms schedule while the POSTs hang: none is late by a POST.
    have = len(d.events("run", job="backup"))
    d.wait_for("run", job="backup", count=have + 5, timeout=20)
    late = [r["late"] for r in d.events("run", job="backup")[have:]]
    assert max(late) < 1.0, late

    started = time.monotonic()
    assert d.stop(timeout=60) == 0
    took = time.monotonic() - started
    # The stop cut the hung POSTs short (STOP_GRACE), long before their 60 s timeout.
    cut = d.events("webhook_failed")
    assert cut, "no POST was cut short at the stop"
    assert all(e["error"].startswith("no answer within") for e in cut)
    assert took < 30, took


def test_a_wrong_variable_is_reported(tmp_path: Path) -> None:
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "plugins.d" / "notify_webhook.py").write_text(NOTIFY)
    conf = tmp_path / "taskd.toml"
    conf.write_text(f'[daemon]\nplugin_dirs = ["plugins.d"]\nstate_dir = "{tmp_path / "s"}"\n')
    result = run_cli("check", "-c", str(conf), env={"TASKD_WEBHOOK_TIMOUT": "3s"})
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "unknown variable TASKD_WEBHOOK_TIMOUT (did you mean TASKD_WEBHOOK_TIMEOUT?)" in out, out
    ok = run_cli("check", "-c", str(conf), env={"TASKD_WEBHOOK_URL": "http://127.0.0.1:9/"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
