"""taskd.testing.JobRunner: a job run as the daemon runs it, from a test. Real plugin files,
the daemon's runner, its thread pool and its process pool (real worker processes)."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import taskd
from taskd.errors import ConfigError, PluginError
from taskd.testing import JobRunner

PLUGIN = '''
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
from pathlib import Path

import taskd

OPENED: list[str] = []
CLOSED: list[str] = []


async def greet(ctx: taskd.JobContext, who: str = "world", times: int = 1) -> dict:
    """Greet someone."""
    async with ctx.state.locked() as state:
        state["greeted"] = state.get("greeted", 0) + times
    return {"hello": who, "job": ctx.job, "attempt": ctx.attempt}


async def flaky(ctx: taskd.JobContext, fail_times: int = 2) -> int:
    """Fail the first attempts."""
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return ctx.attempt


async def slow(ctx: taskd.JobContext, seconds: float = 30.0) -> None:
    """Sleep."""
    await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def _session(tag: str):
    OPENED.append(tag)
    try:
        yield {"tag": tag}
    finally:
        CLOSED.append(tag)


async def with_session(ctx: taskd.JobContext) -> int:
    """Use a long-lived resource."""
    session = await ctx.resource("session", lambda: _session(ctx.run_id))
    return len(OPENED)


def where(path: Path) -> dict:
    """Report the thread and the option's type."""
    return {
        "main_thread": threading.current_thread() is threading.main_thread(),
        "type": type(path).__name__,
    }


def crunch(n: int = 10) -> dict:
    """Add up in a worker process."""
    return {"sum": sum(range(n)), "pid": os.getpid(),
            "worker": multiprocessing.parent_process() is not None}


def unpicklable() -> object:
    """Return what cannot cross a process boundary."""
    return threading.Lock()


def big(n: int = 10) -> str:
    """Return n characters."""
    return "x" * n


@taskd.hookimpl
def taskd_job_types():
    return [
        taskd.JobType("greet", greet),
        taskd.JobType("flaky", flaky),
        taskd.JobType("slow", slow),
        taskd.JobType("with_session", with_session),
        taskd.JobType("where", where, kind="blocking"),
        taskd.JobType("crunch", crunch, kind="cpu"),
        taskd.JobType("unpicklable", unpicklable, kind="cpu"),
        taskd.JobType("big", big, kind="blocking"),
    ]
'''


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "kitjobs.py"
    path.write_text(textwrap.dedent(PLUGIN))
    return path


def module_of(runner: JobRunner) -> Any:
    """The plugin module as the runner loaded it (a drop-in, under its synthetic name)."""
    (record,) = [r for r in runner.host.records if r.source == "file"]
    return record.plugin


class TestKinds:
    """Each kind runs where the daemon runs it."""

    async def test_io_job_result_events_and_state(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            report = await runner.run("greet", {"who": "kit", "times": 2})
            assert report.ok, report.error
            assert report.result == {"hello": "kit", "job": "greet", "attempt": 1}
            assert report.kinds == ["started", "succeeded"]
            assert report.events[-1].result == report.result
            # The result lands in shared state under the job's name, as in the daemon.
            assert runner.state.get("greet") == report.result
            assert runner.state.get("greeted") == 2

    async def test_blocking_job_runs_in_a_thread_with_converted_options(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            report = await runner.run("where", {"path": "/tmp"})
        assert report.result == {"main_thread": False, "type": "PosixPath"}

    async def test_cpu_job_runs_in_a_worker_process(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            report = await runner.run("crunch", {"n": 1000})
        assert report.ok, report.error
        assert report.result["sum"] == 499500
        assert report.result["worker"] is True
        assert report.result["pid"] != os.getpid()

    async def test_unpicklable_result_fails_in_the_test(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            report = await runner.run("unpicklable")
        assert report.outcome == "failed"
        assert report.error is not None and "could not be pickled" in report.error

    async def test_a_cpu_job_type_passed_directly(self) -> None:
        jt = taskd.JobType("square", square, kind="cpu")
        async with JobRunner() as runner:
            report = await runner.run(jt, {"n": 7})
        assert report.result == 49


def square(n: int) -> int:
    return n * n


class TestOptions:
    """Options are checked and converted as from the TOML file, before anything runs."""

    async def test_unknown_option_with_suggestion(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            with pytest.raises(ConfigError) as caught:
                await runner.run("greet", {"whom": "x"})
        text = str(caught.value)
        assert "jobs.greet.options.whom: unknown option 'whom'" in text
        assert "did you mean 'who'?" in text

    async def test_wrong_type(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            with pytest.raises(ConfigError, match="expected an integer, got a string"):
                await runner.run("greet", {"times": "2"})

    async def test_missing_required(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            with pytest.raises(ConfigError, match="missing required option 'path'"):
                await runner.run("where")

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            (None, "TOML has no null"),
            (Path("/tmp"), "write the path as a string"),
            (("a",), "write a list"),
            ({"k": b"x"}, "k: a bytes is not a TOML value"),
            ({1: "x"}, "table key 1 is not a string"),
        ],
    )
    async def test_values_a_toml_file_cannot_hold(
        self, plugin: Path, value: Any, fragment: str
    ) -> None:
        async with JobRunner(plugin) as runner:
            with pytest.raises(ConfigError, match="not a") as caught:
                await runner.run("where", {"path": value})
        assert fragment in str(caught.value)

    async def test_unknown_job_type(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            with pytest.raises(ConfigError, match=r"unknown job type 'gret'.*did you mean 'greet'"):
                await runner.run("gret")


class TestSettings:
    """timeout, retries and retry_backoff as the config reads them; the runner's own logic."""

    async def test_timeout(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            report = await runner.run("slow", timeout="200ms")
        assert report.outcome == "timed_out"
        assert report.kinds == ["started", "timed_out"]

    async def test_retries(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            report = await runner.run("flaky", {"fail_times": 2}, retries=2, retry_backoff=0)
        assert report.ok
        assert (report.result, report.attempts) == (3, 3)
        assert report.kinds == [
            "started",
            "retrying",
            "started",
            "retrying",
            "started",
            "succeeded",
        ]

    async def test_retries_spent(self, plugin: Path) -> None:
        async with JobRunner(plugin) as runner:
            report = await runner.run("flaky", {"fail_times": 5}, retries=1, retry_backoff="0s")
        assert (report.outcome, report.attempts) == ("failed", 2)
        assert report.error == "RuntimeError: attempt 2 fails"

    @pytest.mark.parametrize(
        ("settings", "fragment"),
        [
            ({"timeout": "soon"}, "cannot read 'soon'"),
            ({"retires": 2}, "did you mean 'retries'?"),
            ({"retries": 1000}, "retries"),
        ],
    )
    async def test_bad_settings(
        self, plugin: Path, settings: dict[str, Any], fragment: str
    ) -> None:
        async with JobRunner(plugin) as runner:
            with pytest.raises(ConfigError) as caught:
                await runner.run("greet", **settings)
        assert fragment in str(caught.value)

    async def test_result_size_limit(self, plugin: Path) -> None:
        async with JobRunner(plugin, max_result_size=100) as runner:
            report = await runner.run("big", {"n": 1000})
        assert report.outcome == "failed"
        assert report.error is not None and "max_result_size=100" in report.error


class TestResources:
    """ctx.resource opens once for the runner's runs and closes with the runner."""

    async def test_opened_once_closed_at_the_end(self, plugin: Path) -> None:
        runner = JobRunner(plugin)
        first = await runner.run("with_session")
        second = await runner.run("with_session")
        module = module_of(runner)
        assert (first.result, second.result) == (1, 1)
        assert module.CLOSED == []
        await runner.close()
        closed = module.CLOSED
        assert closed == [first.run_id]
        await runner.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            await runner.run("with_session")


class TestBrokenPlugins:
    """A plugin the daemon would refuse fails the test with the daemon's reason."""

    async def test_missing_ctx_names_the_function(self, tmp_path: Path) -> None:
        path = tmp_path / "noctx.py"
        path.write_text(
            "import taskd\n\nasync def fetch(url: str) -> None: ...\n\n"
            "@taskd.hookimpl\ndef taskd_job_types():\n    return [taskd.JobType('fetch', fetch)]\n"
        )
        with pytest.raises(PluginError) as caught:
            JobRunner(path).job_types  # noqa: B018 - loading is the point
        assert "fetch()" in str(caught.value)
        assert "first parameter 'url'" in str(caught.value)

    async def test_import_error(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.py"
        path.write_text("import no_such_module_for_kit_tests\n")
        with pytest.raises(PluginError, match="no_such_module_for_kit_tests"):
            async with JobRunner(path):
                pass

    async def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(PluginError, match="cannot read plugin"):
            JobRunner(tmp_path / "nope.py").job_types  # noqa: B018

    async def test_job_type_object_with_missing_ctx(self) -> None:
        async def fetch(url: str) -> None: ...

        async with JobRunner() as runner:
            with pytest.raises(TypeError, match="first parameter 'url'"):
                await runner.run(taskd.JobType("fetch", fetch), {"url": "x"})


def test_threads_do_not_leak(plugin: Path) -> None:
    """Closing stops the pools: no thread of the runner's is left behind."""
    import asyncio

    before = set(threading.enumerate())

    async def main() -> None:
        async with JobRunner(plugin) as runner:
            await runner.run("where", {"path": "/"})
            await runner.run("crunch")

    asyncio.run(main())
    # The pool never waits for its threads (a stuck one would hold the exit); idle ones
    # leave once told to, within moments.
    deadline = time.monotonic() + 10
    while (left := [t for t in set(threading.enumerate()) - before if t.is_alive()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert left == []


class TestFixtures:
    """The pytest plugin's fixtures, as this suite (asyncio_mode = "auto") gets them."""

    async def test_taskd_run(self, taskd_run: Any, plugin: Path) -> None:
        first = await taskd_run("greet", {"times": 1}, plugin=plugin)
        second = await taskd_run("greet", {"times": 2}, plugin=str(plugin))
        assert (first.ok, second.ok) == (True, True)
        assert second.result["hello"] == "world"

    async def test_taskd_runner_shares_state_and_closes_resources(
        self, taskd_runner: Any, plugin: Path
    ) -> None:
        runner = taskd_runner(plugin)
        await runner.run("greet", {"times": 2})
        await runner.run("greet", {"times": 3})
        assert runner.state.get("greeted") == 5
