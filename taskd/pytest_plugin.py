"""taskd's pytest plugin: the ``taskd_run`` and ``taskd_runner`` fixtures.

pytest loads it by itself wherever taskd is installed (entry point group ``pytest11``), so it
imports nothing heavy until a fixture is used, and never fails to load: without
pytest-asyncio the fixtures say what to install instead.

::

    PLUGIN = Path(__file__).with_name("disk.py")

    async def test_disk_free(taskd_run):
        report = await taskd_run("disk_free", {"min_free_gib": 0.0}, plugin=PLUGIN)
        assert report.ok, report.error

    async def test_two_runs_share_a_session(taskd_runner):
        runner = taskd_runner(PLUGIN)
        first = await runner.run("fetch", {"url": URL})
        second = await runner.run("fetch", {"url": URL})

Both need pytest-asyncio, with ``asyncio_mode = "auto"`` (or each test marked
``@pytest.mark.asyncio``). Everything a fixture started (pools, resources the jobs opened)
is closed when the test ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from taskd.plugin.jobtype import JobType
    from taskd.testing import JobRunner, PluginLike, RunReport

RunnerFactory = Callable[..., "JobRunner"]
RunJob = Callable[..., Awaitable["RunReport"]]

_NEEDS = (
    "the taskd_run and taskd_runner fixtures are async and need pytest-asyncio: "
    'pip install pytest-asyncio, and set asyncio_mode = "auto" under [tool.pytest.ini_options] '
    "(or mark each test @pytest.mark.asyncio)"
)


def _needs_pytest_asyncio(func: Callable[..., Any]) -> Any:
    """In place of pytest_asyncio.fixture when it is not installed: a fixture that fails
    the test saying what to install (an async fixture would fail obscurely)."""

    def fail() -> None:
        pytest.fail(_NEEDS, pytrace=False)

    fail.__name__ = func.__name__
    fail.__doc__ = func.__doc__
    return pytest.fixture(name=func.__name__)(fail)


try:
    import pytest_asyncio

    _async_fixture: Callable[[Callable[..., Any]], Any] = pytest_asyncio.fixture
except ImportError:  # the plugin must load anyway: pytest loads it for every project
    _async_fixture = _needs_pytest_asyncio


@_async_fixture
async def taskd_runner() -> AsyncIterator[RunnerFactory]:
    """A factory: ``taskd_runner(*plugins, **daemon_settings)`` gives a
    :class:`taskd.testing.JobRunner`; each is closed when the test ends."""
    from taskd.testing import JobRunner

    made: list[JobRunner] = []

    def make(*plugins: PluginLike, **settings: Any) -> JobRunner:
        runner = JobRunner(*plugins, **settings)
        made.append(runner)
        return runner

    try:
        yield make
    finally:
        for runner in made:
            await runner.close()


@_async_fixture
async def taskd_run(taskd_runner: RunnerFactory) -> RunJob:
    """``await taskd_run(job_type, options, plugin=PATH_OR_MODULE, **job_settings)``: one
    run as the daemon makes it, returning a :class:`taskd.testing.RunReport`. Runs of the
    same plugin in one test share a runner (shared state, resources)."""
    runners: dict[Any, JobRunner] = {}

    async def run(
        job_type: str | JobType,
        options: Mapping[str, Any] | None = None,
        *,
        plugin: PluginLike | None = None,
        **settings: Any,
    ) -> RunReport:
        key = id(plugin) if plugin is not None and not isinstance(plugin, str) else plugin
        if isinstance(plugin, str) or hasattr(plugin, "__fspath__"):
            key = str(plugin)
        runner = runners.get(key)
        if runner is None:
            plugins = () if plugin is None else (plugin,)
            # No plugin named: the installed ones, as the daemon loads by default.
            runner = runners[key] = taskd_runner(*plugins, entry_points=plugin is None)
        return await runner.run(job_type, options, **settings)

    return run
