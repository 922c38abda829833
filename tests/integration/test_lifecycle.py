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
