"""The daemon as a real process: start, run jobs, stop on signals, one instance per state_dir."""

from __future__ import annotations

import signal

from tests.helpers import DaemonProc

HELLO = """
import taskd

async def hello(ctx, name: str = "world") -> dict:
    return {"hello": name}

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("hello", hello)]
"""

CONFIG = """
[jobs.greet]
type = "hello"
every = "200ms"
[jobs.greet.options]
name = "taskd"
"""


class TestStartStop:
    """A daemon starts, runs its job on schedule and stops cleanly."""

    def test_runs_and_stops_on_sigterm(self, daemon_factory) -> None:
        d: DaemonProc = daemon_factory(CONFIG, {"hello.py": HELLO}).start()
        runs = d.wait_for("run", job="greet", outcome="succeeded", count=3, timeout=5)
        assert all(r["late"] >= 0 for r in runs)
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        assert d.events("stopped")
        rows = d.history("greet")
        assert len(rows) >= 3
        assert {r["outcome"] for r in rows} == {"succeeded"}

    def test_sigint_stops_cleanly(self, daemon_factory) -> None:
        d = daemon_factory(CONFIG, {"hello.py": HELLO}).start()
        d.signal(signal.SIGINT)
        assert d.wait_exit() == 0

    def test_second_daemon_on_same_state_dir_refuses(self, daemon_factory) -> None:
        first = daemon_factory(CONFIG, {"hello.py": HELLO}, name="one").start()
        second = daemon_factory(CONFIG, {"hello.py": HELLO}, name="one")
        second.start(wait=False)
        assert second.wait_exit(timeout=15) == 3
        refused = second.wait_for("cannot_start")[0]
        assert f"pid {first.pid}" in refused["error"]
        assert "already running" in refused["error"]
        assert first.proc is not None and first.proc.poll() is None


class TestInvalidConfigAtStart:
    """An invalid config stops `taskd run` before it starts, with EX_CONFIG and every error."""

    def test_exit_78_listing_errors(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.greet]
            type = "hello"
            every = "1s"
            timout = "5s"
            """,
            {"hello.py": HELLO},
        )
        d.start(wait=False)
        assert d.wait_exit() == 78
        out = "\n".join(d.raw)
        assert "jobs.greet.timout" in out and "did you mean 'timeout'?" in out
        assert not (d.dir / "state" / "taskd.lock").exists()

    def test_options_errors_exit_78_too(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.greet]
            type = "hello"
            every = "1s"
            [jobs.greet.options]
            nmae = "x"
            """,
            {"hello.py": HELLO},
        )
        d.start(wait=False)
        assert d.wait_exit() == 78
        out = "\n".join(d.raw)
        assert "jobs.greet.options.nmae" in out and "did you mean 'name'?" in out


FAILING = """
import taskd

async def boom(ctx) -> None:
    raise RuntimeError("disk on fire")

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("boom", boom)]
"""


class TestRunLine:
    """Every run ends in one canonical `run` log line with the fields an operator greps for."""

    def test_success_and_failure_lines(self, daemon_factory) -> None:
        d = daemon_factory(
            CONFIG + '\n[jobs.bad]\ntype = "boom"\nevery = "200ms"\n',
            {"hello.py": HELLO, "boom.py": FAILING},
        ).start()
        ok = d.wait_for("run", job="greet", outcome="succeeded")[0]
        bad = d.wait_for("run", job="bad", outcome="failed")[0]
        for line in (ok, bad):
            assert {"job", "run_id", "attempt", "outcome", "duration", "late", "timestamp"} <= set(
                line
            )
            assert line["attempt"] == 1 and line["duration"] >= 0
        assert ok["result"] == {"hello": "taskd"} and "error" not in ok
        assert bad["error"] == "RuntimeError: disk on fire" and bad["level"] == "error"
        assert d.stop() == 0
        # One line per run: as many `run` lines as history rows for the job.
        assert len(d.events("run", job="bad")) == len(d.history("bad"))


class TestIdle:
    """An idle daemon sleeps: no busy loop while waiting for far-away ticks."""

    def test_no_spinning_with_many_idle_jobs(self, daemon_factory) -> None:
        import time

        import psutil

        jobs = "".join(f'\n[jobs.j{i}]\ntype = "hello"\nevery = "1h"\n' for i in range(300))
        d = daemon_factory(jobs, {"hello.py": HELLO}).start()
        proc = psutil.Process(d.pid)
        time.sleep(0.5)  # let start-up work settle
        before = proc.cpu_times()
        time.sleep(2.0)
        after = proc.cpu_times()
        used = (after.user + after.system) - (before.user + before.system)
        # A spinning scheduler burns ~2 s of CPU here; a sleeping one next to nothing.
        assert used < 0.2, f"idle daemon used {used:.3f}s CPU in 2s"
        assert d.stop() == 0


class TestCleanExit:
    """A stopped daemon leaves nothing behind in /tmp (multiprocessing's temp directory)."""

    def test_no_pymp_directory_left(self, daemon_factory, tmp_path) -> None:
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        d = daemon_factory(
            '[jobs.h]\ntype = "hello"\nevery = "1h"\n[jobs.c]\ntype = "crunch"\nevery = "1h"\n',
            {"hello.py": HELLO, "cpu.py": CPU},
            env={"TMPDIR": str(tmp)},
        ).start()
        assert any(p.name.startswith("pymp-") for p in tmp.iterdir())  # the pool made one
        assert d.stop() == 0
        assert [p.name for p in tmp.iterdir() if p.name.startswith("pymp-")] == []


CPU = """
import taskd

def crunch(n: int = 10) -> int:
    return sum(range(n))

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("crunch", crunch, kind="cpu")]
"""


GC_STATE = """
import gc
import taskd

async def gc_state(ctx) -> dict:
    return {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("gc_state", gc_state)]
"""


class TestCollectorAfterStart:
    """`taskd run` turns the cyclic collector off while it builds its jobs; once started it
    is on again (off, cyclic garbage from every run would pile up for the daemon's life),
    and what the start built is frozen out of its way."""

    def test_collector_enabled_and_start_frozen(self, daemon_factory) -> None:
        config = '[jobs.gc]\ntype = "gc_state"\nevery = "200ms"\n'
        d = daemon_factory(config, {"gc_state.py": GC_STATE}).start()
        state = d.wait_for("run", job="gc", outcome="succeeded")[0]["result"]
        assert state["enabled"] is True
        assert state["frozen"] > 0
        assert d.stop() == 0
