"""ctx.resource against the real daemon: one resource per job across runs, a fresh one after a
reload changes the job (the old one closed once its run ends), closed when a reload removes
the job and when the daemon stops. The resource logs its opening and closing to a file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import DaemonProc
from tests.integration.test_control import cli
from tests.integration.test_reload import reload

pytestmark = pytest.mark.timeout(60)

PLUGIN = """
import asyncio
import contextlib
import itertools

import taskd

_ids = itertools.count(1)


@contextlib.asynccontextmanager
async def pool(log: str, tag: str):
    n = next(_ids)
    with open(log, "a") as f:
        f.write(f"open {n} {tag}\\n")
    try:
        yield f"{tag}-{n}"
    finally:
        with open(log, "a") as f:
            f.write(f"close {n} {tag}\\n")


async def use(ctx, log: str, tag: str = "a", hold: float = 0.0) -> str:
    conn = await ctx.resource("pool", lambda: pool(log, tag))
    await asyncio.sleep(hold)
    return conn


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("use", use)]
"""


def job(log: Path, tag: str, hold: float = 0.0, every: str = "100ms") -> str:
    return f"""
[jobs.db]
type = "use"
every = "{every}"
overlap = "allow"
[jobs.db.options]
log = "{log}"
tag = "{tag}"
hold = {hold}
"""


OTHER = """
[jobs.other]
type = "use"
every = "1h"
[jobs.other.options]
log = "{log}"
tag = "other"
"""


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def wait_lines(log: Path, want: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not set(want) <= set(lines(log)):
        assert time.monotonic() < deadline, f"wanted {want}, have {lines(log)}"
        time.sleep(0.05)


def test_one_resource_across_runs_reload_and_stop(daemon_factory, tmp_path: Path) -> None:
    log = tmp_path / "pool.log"
    d: DaemonProc = daemon_factory(job(log, "a"), {"use.py": PLUGIN}).start()
    d.wait_for("run", job="db", outcome="succeeded", count=5)
    assert lines(log) == ["open 1 a"]  # five runs, one pool
    results = {r["result"] for r in d.history("db") if r["outcome"] == "succeeded"}
    assert results == {'"a-1"'}  # stored as JSON text

    # A reload changes the job's options: its next run opens a new pool from them, the old
    # one is closed.
    reload(d, job(log, "b"))
    wait_lines(log, ["close 1 a", "open 2 b"])
    have = len(d.events("run", job="db", outcome="succeeded"))
    d.wait_for("run", job="db", outcome="succeeded", count=have + 3)
    assert lines(log).count("open 2 b") == 1 and not any(x.startswith("open 3") for x in lines(log))

    # Unchanged by a reload: the pool stays.
    reload(d, job(log, "b"))
    time.sleep(0.5)
    assert "close 2 b" not in lines(log)

    # Removed by a reload: closed.
    reload(d, OTHER.format(log=log))
    wait_lines(log, ["close 2 b"])

    # Back, used, then the daemon stops: closed at the stop.
    reload(d, job(log, "c"))
    wait_lines(log, ["open 3 c"])
    assert d.stop() == 0
    assert "close 3 c" in lines(log)
    assert [x for x in lines(log) if x.startswith("open")] == ["open 1 a", "open 2 b", "open 3 c"]
    assert sorted(x for x in lines(log) if x.startswith("close")) == [
        "close 1 a",
        "close 2 b",
        "close 3 c",
    ]


def test_a_run_in_flight_keeps_its_resource_through_a_reload(
    daemon_factory, tmp_path: Path
) -> None:
    log = tmp_path / "pool.log"
    d: DaemonProc = daemon_factory(job(log, "a", hold=1.5, every="1h"), {"use.py": PLUGIN})
    d.start()
    assert cli(d, "trigger", "db").returncode == 0
    wait_lines(log, ["open 1 a"])
    reload(d, job(log, "b", hold=0.0, every="1h"))
    time.sleep(0.5)
    assert "close 1 a" not in lines(log)  # its run still uses it
    d.wait_for("run", job="db", outcome="succeeded", count=1, timeout=10)
    wait_lines(log, ["close 1 a"])


def test_a_failing_setup_fails_the_run_and_is_tried_again(daemon_factory, tmp_path: Path) -> None:
    log = tmp_path / "pool.log"
    flaky = PLUGIN.replace(
        "    n = next(_ids)\n",
        "    n = next(_ids)\n    if n <= 2:\n        raise ConnectionRefusedError(f'server down ({n})')\n",
    )
    d: DaemonProc = daemon_factory(job(log, "a"), {"use.py": flaky}).start()
    d.wait_for("run", job="db", outcome="succeeded", count=2)
    failed = d.events("run", job="db", outcome="failed")
    assert len(failed) == 2
    assert "ConnectionRefusedError: server down (1)" in failed[0]["error"]
    assert lines(log) == ["open 3 a"]  # opened by the first run after the failures, kept
    assert d.stop() == 0
