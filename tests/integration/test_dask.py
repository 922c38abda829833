"""executor = "dask" through `taskd run`: a real LocalCluster of 2 workers that taskd starts
in its helper process (one daemon for most cases, to keep the file short), an unreachable
tcp:// scheduler, and the helper's life on its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from taskd.run.executor._base import Call, ExecutorSettings
from taskd.run.executor.dask_helper import DaskUnavailable, LocalHelper, session_processes
from tests.helpers import TICK_PLUGIN, DaemonProc, daemon_table, free_port, poll, run_cli

pytest.importorskip("distributed")

PLUGIN = (Path(__file__).resolve().parent.parent / "plugins" / "dask_jobs.py").read_text()
pytestmark = pytest.mark.timeout(120)


def _jobs(tmp: Path) -> str:
    return f"""
[dask]
scheduler = "local"
workers = 2

[jobs.where]
type = "where"
every = "1h"
executor = "dask"

[jobs.in_pool]
type = "where"
every = "1h"

{_slow(tmp, "slow", 'timeout = "1s"', "")}
{_slow(tmp, "hold1", "", "seconds = 4.0")}
{_slow(tmp, "hold2", "", "seconds = 4.0")}
{_slow(tmp, "busy1", 'timeout = "3s"', "")}
{_slow(tmp, "busy2", 'timeout = "3s"', "")}
[jobs.queued]
type = "where"
every = "1h"
executor = "dask"
timeout = "1s"

[jobs.die]
type = "die_once"
every = "1h"
executor = "dask"
retries = 1
retry_backoff = "100ms"
[jobs.die.options]
marker = "{tmp / "died"}"
"""


def _slow(tmp: Path, name: str, timeout: str, seconds: str) -> str:
    """A dask job of the slow type that writes ``<name>.pid`` when its task starts."""
    return f"""
[jobs.{name}]
type = "slow"
every = "1h"
executor = "dask"
{timeout}
[jobs.{name}.options]
pidfile = "{tmp / f"{name}.pid"}"
{seconds}
"""


def trigger(d: DaemonProc, job: str, *, wait: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["trigger", job, "-c", str(d.config_path), *(["--wait"] if wait else [])]
    return run_cli(*args, timeout=60)


def ended(d: DaemonProc, job: str, count: int = 1) -> dict[str, object]:
    return d.wait_for("run", job=job, count=count, timeout=60)[count - 1]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, Path, int]]:
    """One daemon with a local cluster for the cases that can share it."""
    tmp = tmp_path_factory.mktemp("dask")
    port = free_port()
    config = daemon_table(metrics_address=f'"127.0.0.1:{port}"') + _jobs(tmp)
    d = DaemonProc(tmp / "d", config, {"dask_jobs.py": PLUGIN}, None)
    d.start(timeout=30)
    try:
        yield d, tmp, port
    finally:
        d.kill()


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def helper_pid(d: DaemonProc) -> int:
    """The pid of the helper running now (the latest started)."""
    return int(d.wait_for("dask_local_started", timeout=60)[-1]["pid"])


class TestLocalCluster:
    def test_a_dask_job_runs_in_a_dask_worker_not_in_the_pool(self, local) -> None:
        d, _, _ = local
        sid = helper_pid(d)
        assert trigger(d, "where").returncode == 0
        assert trigger(d, "in_pool").returncode == 0
        on_dask = ended(d, "where")
        in_pool = ended(d, "in_pool")
        assert on_dask["outcome"] == "succeeded", on_dask
        # The worker is the helper's, in its session; the pool's is in the daemon's.
        assert on_dask["result"]["sid"] == sid
        assert in_pool["result"]["sid"] == os.getsid(d.pid) != sid
        assert on_dask["result"]["pid"] in {p.pid for p in session_processes(sid)}

    def test_a_timeout_restarts_only_its_worker_and_another_run_goes_on(self, local) -> None:
        d, tmp, _ = local
        before = len(d.events("run", job="where"))
        assert trigger(d, "slow", wait=False).returncode == 0
        poll((tmp / "slow.pid").exists, timeout=30)
        slow_pid = int((tmp / "slow.pid").read_text())
        # While slow holds one worker, a run goes to the other one.
        assert trigger(d, "where").returncode == 0
        other = ended(d, "where", before + 1)
        assert other["outcome"] == "succeeded"
        assert other["result"]["pid"] != slow_pid
        run = ended(d, "slow")
        assert run["outcome"] == "timed_out", run
        restart = d.wait_for("dask_worker_restart", timeout=30)[0]
        assert restart["key"].startswith(f"taskd-{run['run_id']}")
        # Dask cannot stop the task: taskd had its worker process replaced.
        poll(lambda: not psutil.pid_exists(slow_pid), timeout=30)

    def test_a_run_timing_out_in_the_queue_restarts_no_worker(self, local) -> None:
        """Both workers busy with runs that have no timeout; a third run times out while it
        waits for one: it never ran, so no worker is restarted and both busy runs end well."""
        d, tmp, _ = local
        for job in ("hold1", "hold2"):
            assert trigger(d, job, wait=False).returncode == 0
        poll(lambda: (tmp / "hold1.pid").exists() and (tmp / "hold2.pid").exists(), timeout=30)
        assert trigger(d, "queued").returncode == 1
        run = ended(d, "queued")
        assert run["outcome"] == "timed_out", run
        for job in ("hold1", "hold2"):
            assert ended(d, job)["outcome"] == "succeeded", ended(d, job)
        assert d.events("dask_worker_restart", key=f"taskd-{run['run_id']}-1") == []

    def test_a_run_queued_behind_a_restarted_worker_is_sent_again(self, local) -> None:
        """Both workers run a run that times out, and a third run waits behind one of them:
        the worker taskd kills takes the waiting run down with it, which taskd sends again
        (the same attempt: it never started) rather than failing it."""
        d, tmp, _ = local
        before = len(d.events("run", job="where"))
        for job in ("busy1", "busy2"):
            assert trigger(d, job, wait=False).returncode == 0
        poll(lambda: (tmp / "busy1.pid").exists() and (tmp / "busy2.pid").exists(), timeout=30)
        assert trigger(d, "where", wait=False).returncode == 0
        busy = {int((tmp / f"{job}.pid").read_text()) for job in ("busy1", "busy2")}
        for job in ("busy1", "busy2"):
            assert ended(d, job)["outcome"] == "timed_out"
        run = ended(d, "where", before + 1)
        assert run["outcome"] == "succeeded", run
        assert run["attempt"] == 1
        assert run["result"]["pid"] not in busy
        assert d.wait_for("dask_task_resent", key=f"taskd-{run['run_id']}-1", timeout=10)

    def test_a_dead_worker_fails_the_attempt_and_the_retry_succeeds(self, local) -> None:
        d, tmp, _ = local
        assert trigger(d, "die").returncode == 0
        retrying = d.wait_for("run_retrying", job="die", timeout=30)[0]
        assert retrying["error"].startswith("WorkerDied: dask worker tcp://127.0.0.1:")
        run = ended(d, "die")
        assert run["outcome"] == "succeeded", run
        assert run["attempt"] == 2
        assert run["result"] == "survived"
        assert not psutil.pid_exists(int((tmp / "died").read_text()))

    def test_a_reload_keeps_the_cluster(self, local) -> None:
        d, _, _ = local
        sid = helper_pid(d)
        before = len(d.events("run", job="where"))
        d.signal(signal.SIGHUP)
        d.wait_for("reloaded", timeout=30)
        assert trigger(d, "where").returncode == 0
        assert ended(d, "where", before + 1)["result"]["sid"] == sid
        assert len(d.events("dask_local_started")) == 1

    def test_a_killed_helper_is_started_anew_by_the_next_run(self, local) -> None:
        d, _, _ = local
        sid = helper_pid(d)
        before = len(d.events("run", job="where"))
        os.kill(sid, signal.SIGKILL)
        poll(lambda: not psutil.pid_exists(sid), timeout=10)  # reaped: taskd has seen it end
        assert trigger(d, "where").returncode == 0
        run = ended(d, "where", before + 1)
        assert d.wait_for("dask_local_lost", pid=sid, timeout=10)
        assert run["result"]["sid"] == helper_pid(d) != sid
        assert session_processes(sid) == []  # what the killed helper left was ended

    def test_status_and_metrics_show_the_cluster(self, local) -> None:
        d, _, port = local
        status = run_cli("status", "--json", "-c", str(d.config_path))
        figures = json.loads(status.stdout)["daemon"]["executors"]["dask"]
        assert figures["up"] == 1.0
        plain = run_cli("status", "-c", str(d.config_path)).stdout
        assert "  dask:   up, " in plain
        assert " workers, " in plain
        text = metrics(port)
        assert "taskd_dask_up 1.0" in text
        assert "taskd_dask_workers " in text
        assert "taskd_dask_orphaned_total 0.0" in text

    def test_the_stop_leaves_no_process_of_the_cluster(self, local) -> None:
        d, _, _ = local
        sid = helper_pid(d)
        assert len(session_processes(sid)) >= 3  # the helper and its 2 workers at least
        assert d.stop(timeout=30) == 0
        assert session_processes(sid) == []


def test_an_unreachable_scheduler_fails_the_run_and_the_daemon_goes_on(
    daemon_factory, tmp_path: Path
) -> None:
    port = free_port()
    mport = free_port()
    config = (
        daemon_table(metrics_address=f'"127.0.0.1:{mport}"')
        + f"""
[dask]
scheduler = "tcp://127.0.0.1:{port}"
connect_timeout = "1s"

[jobs.where]
type = "where"
every = "1h"
executor = "dask"

[jobs.tick]
type = "tick"
every = "1h"
"""
    )
    d = daemon_factory(config, {"dask_jobs.py": PLUGIN, "tick.py": TICK_PLUGIN}).start()
    d.wait_for("executor_unavailable", executor="dask", timeout=30)
    assert trigger(d, "where").returncode == 1
    run = ended(d, "where")
    assert run["outcome"] == "failed"
    assert run["error"].startswith(
        f"DaskUnavailable: dask scheduler tcp://127.0.0.1:{port} unreachable"
    )
    assert trigger(d, "tick").returncode == 0  # the daemon goes on
    assert ended(d, "tick")["outcome"] == "succeeded"
    # A cluster that never came up is shown down, not left out.
    status = run_cli("status", "--json", "-c", str(d.config_path))
    assert json.loads(status.stdout)["daemon"]["executors"]["dask"]["up"] == 0.0
    assert "  dask:   DOWN, 0 workers" in run_cli("status", "-c", str(d.config_path)).stdout
    assert "taskd_dask_up 0.0" in metrics(mport)
    assert d.stop() == 0


def test_a_scheduler_that_never_answers_fails_runs_in_their_bounds(
    daemon_factory, tmp_path: Path
) -> None:
    """An address that accepts TCP and never answers (a hung scheduler, a wrong port behind
    a proxy): a run with a timeout ends timed out, one without fails by connect_timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        config = f"""
[dask]
scheduler = "tcp://127.0.0.1:{silent.getsockname()[1]}"
connect_timeout = "2s"

[jobs.bounded]
type = "where"
every = "1h"
executor = "dask"
timeout = "1s"

[jobs.unbounded]
type = "where"
every = "1h"
executor = "dask"
"""
        d = daemon_factory(config, {"dask_jobs.py": PLUGIN}).start()
        assert trigger(d, "bounded").returncode == 1
        assert ended(d, "bounded")["outcome"] == "timed_out"
        assert trigger(d, "unbounded").returncode == 1
        run = ended(d, "unbounded")
        assert run["outcome"] == "failed"
        assert run["error"].startswith("DaskUnavailable: dask scheduler tcp://127.0.0.1:")
        assert "no answer within 2s" in run["error"]
        assert d.stop() == 0


def test_a_reload_without_dask_jobs_ends_the_local_cluster(daemon_factory) -> None:
    config = """
[dask]
scheduler = "local"
workers = 1

[jobs.where]
type = "where"
every = "1h"
executor = "dask"
"""
    tick = '[jobs.tick]\ntype = "tick"\nevery = "1h"\n'
    d = daemon_factory(config + tick, {"dask_jobs.py": PLUGIN, "tick.py": TICK_PLUGIN}).start()
    assert trigger(d, "where").returncode == 0
    sid = helper_pid(d)
    d.write_config(tick)  # no dask job, no [dask]
    d.signal(signal.SIGHUP)
    d.wait_for("reloaded", timeout=30)
    assert d.wait_for("executor_retired", executor="dask", timeout=30)
    poll(lambda: session_processes(sid) == [], timeout=30)
    assert d.events("restart_needed") == []
    assert d.stop() == 0


async def test_a_remote_cluster_is_left_alone_and_the_orphan_counted(
    daemon_factory, tmp_path: Path
) -> None:
    """A tcp:// scheduler is a cluster taskd does not own (here one started for the test):
    a timed-out run's worker is not restarted, its task runs on, and it is counted."""
    helper = await LocalHelper.start(1)
    try:
        port = free_port()
        pidfile = tmp_path / "slow.pid"
        config = (
            daemon_table(metrics_address=f'"127.0.0.1:{port}"')
            + f"""
[dask]
scheduler = "{helper.address}"

[jobs.slow]
type = "slow"
every = "1h"
executor = "dask"
timeout = "500ms"
[jobs.slow.options]
pidfile = "{pidfile}"
seconds = 4.0
"""
        )
        d = daemon_factory(config, {"dask_jobs.py": PLUGIN})
        await asyncio.to_thread(d.start)
        await asyncio.to_thread(d.wait_for, "dask_connected", timeout=30)
        result = await asyncio.to_thread(trigger, d, "slow")
        assert result.returncode == 1
        run = await asyncio.to_thread(ended, d, "slow")
        assert run["outcome"] == "timed_out"
        orphan = (await asyncio.to_thread(d.wait_for, "dask_task_orphaned", timeout=30))[0]
        assert orphan["key"].startswith(f"taskd-{run['run_id']}")
        assert d.events("dask_worker_restart") == []
        worker = int(pidfile.read_text())
        assert psutil.pid_exists(worker)  # the task runs on in the cluster's worker
        assert "taskd_dask_orphaned_total 1.0" in await asyncio.to_thread(metrics, port)
        assert await asyncio.to_thread(d.stop) == 0
        assert helper.proc.returncode is None  # taskd's stop leaves a cluster it does not own
    finally:
        await helper.close(5.0)


class Scheduler:
    """A dask scheduler and one worker on a fixed address (the ``dask`` command beside
    this Python), that can go away and come back there: a remote cluster taskd does not own."""

    def __init__(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def up(self) -> None:
        dask = str(Path(sys.executable).parent / "dask")
        port = self.address.rpartition(":")[2]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        args = ["--host", "127.0.0.1", "--port", port, "--no-dashboard"]
        self.procs.append(subprocess.Popen([dask, "scheduler", *args], **quiet))
        poll(lambda: _listens(int(port)), timeout=60)
        worker = [dask, "worker", self.address, "--nthreads", "1", "--no-nanny"]
        self.procs.append(subprocess.Popen([*worker, "--no-dashboard"], **quiet))

    def down(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()


def _listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_a_remote_client_that_gave_up_is_made_anew_when_the_scheduler_is_back() -> None:
    """The Client stops reconnecting after connect_timeout and closes for good: the next
    run after the scheduler is back starts a new one."""
    from taskd.run.executor.dask import DaskExecutor

    cluster = Scheduler()
    ex = DaskExecutor(ExecutorSettings({"scheduler": cluster.address, "connect_timeout": "1s"}))
    try:
        await asyncio.to_thread(cluster.up)
        assert (await ex.run(_getpid("q1-1")))[0] > 0
        cluster.down()
        await asyncio.to_thread(poll, lambda: ex.client.status == "closed", timeout=30)
        with pytest.raises(DaskUnavailable):
            await ex.run(_getpid("q2-1"))
        await asyncio.to_thread(cluster.up)
        assert (await asyncio.wait_for(ex.run(_getpid("q3-1")), 60))[0] > 0
        assert ex.client.status == "running"
    finally:
        await ex.close(kill=True, timeout=0)
        cluster.down()


def _getpid(key: str) -> Call:
    """A run of ``os.getpid`` (importable on any worker, so it goes by reference)."""
    return Call(os.getpid, {}, None, None, 1 << 20, f"job 'q' run {key}", key)


async def ended_alone(helper: LocalHelper) -> int:
    """The helper's exit status, once it and every process of its session are gone (it
    closed its cluster itself: nothing here kills them)."""
    code = await asyncio.wait_for(helper.proc.wait(), 30)
    for _ in range(100):
        if not helper.session():
            break
        await asyncio.sleep(0.1)
    assert helper.session() == []
    return code


async def test_the_helper_ends_its_cluster_when_its_stdin_closes() -> None:
    helper = await LocalHelper.start(2)
    try:
        assert helper.address.startswith("tcp://127.0.0.1:")
        procs = helper.session()
        assert helper.pid in {p.pid for p in procs}
        assert len(procs) >= 3
        assert helper.proc.stdin is not None
        helper.proc.stdin.close()  # the lifeline, alone: no signal, no kill
        assert await ended_alone(helper) == 0
    finally:
        await helper.close(1.0)


async def test_the_helper_ends_its_cluster_on_sigterm() -> None:
    helper = await LocalHelper.start(1)
    try:
        os.kill(helper.pid, signal.SIGTERM)  # what PR_SET_PDEATHSIG sends if the daemon dies
        assert await ended_alone(helper) == 0
    finally:
        await helper.close(1.0)
