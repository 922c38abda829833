"""An idle daemon sleeps: its threads do not wake while nothing is due (the loop-lag probe and
the blocked-loop watchdog park), and a run that then blocks the loop is still reported."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import daemon_table, poll, run_cli
from tests.integration.test_loopwatch_daemon import HOG

WINDOW = 2.0  # seconds of idleness looked at


def voluntary_switches(pid: int) -> int:
    """Times the daemon's threads went to sleep, summed: each is one wake-up after."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # a thread that just ended
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_idle_daemon_sleeps_and_still_reports_a_block(daemon_factory, loop: str) -> None:
    # Jobs an hour apart: nothing is due in the window (a manual trigger starts the hog).
    config = daemon_table(loop_block_threshold='"200ms"') + "".join(
        f'[jobs.idle{i}]\ntype = "hog"\nevery = "1h"\n' for i in range(20)
    )
    env = {"TASKD_LOOP": "asyncio"} if loop == "asyncio" else {}
    d = daemon_factory(config, {"hog.py": HOG}, env=env).start()
    assert d.events("started")[0]["loop"] == loop
    if time.time() % 3600 > 3600 - 30:
        pytest.skip("the hourly tick falls in the window")  # pragma: no cover

    # The start's own work ends and the probe parks (later on a loaded machine, where the
    # start's tail takes longer): wait for a quiet half second, then count over the window.
    def quiet() -> bool:
        before = voluntary_switches(d.pid)
        time.sleep(0.5)
        return voluntary_switches(d.pid) - before <= 1

    poll(quiet, timeout=15, interval=0)
    before = voluntary_switches(d.pid)
    time.sleep(WINDOW)
    woke = voluntary_switches(d.pid) - before
    # The probe (4 a second) and the watchdog thread (4 more) made 16 here before they
    # parked; what may remain is the clock check (every 10 s): at most one, and its echo.
    assert woke <= 3, woke
    # A block that starts from idle is reported, naming the job.
    result = run_cli("trigger", "idle3", "-c", str(d.config_path), timeout=30)
    assert result.returncode == 0, result.stderr
    blocked = d.wait_for("loop_blocked", timeout=10)[0]
    assert blocked["job"] == "idle3"
    assert blocked["frame"].endswith(" in hog")
    poll(lambda: d.events("loop_unblocked"), timeout=10)
    assert d.stop() == 0
