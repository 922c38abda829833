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

import os
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


def _check_asyncio(request: pytest.FixtureRequest) -> None:
    # pytest-asyncio registers itself as "asyncio"; it may be installed yet blocked (-p no:asyncio).
    if not request.config.pluginmanager.has_plugin("asyncio"):
        pytest.fail(_NEEDS, pytrace=False)


try:
    import pytest_asyncio

    _async_fixture: Callable[[Callable[..., Any]], Any] = pytest_asyncio.fixture
except ImportError:  # this plugin must load anyway: pytest loads it for every project
    _async_fixture = pytest.fixture  # never used: _check_asyncio fails the test first


@pytest.fixture
def taskd_runner(request: pytest.FixtureRequest) -> RunnerFactory:
    """A factory: ``taskd_runner(*plugins, **daemon_settings)`` gives a
    :class:`taskd.testing.JobRunner`; each is closed when the test ends."""
    _check_asyncio(request)
    factory: RunnerFactory = request.getfixturevalue("_taskd_runner")
    return factory


@pytest.fixture
def taskd_run(request: pytest.FixtureRequest) -> RunJob:
    """``await taskd_run(job_type, options, plugin=PATH_OR_MODULE, **job_settings)``: one
    run as the daemon makes it, returning a :class:`taskd.testing.RunReport`. Runs of the
    same plugin in one test share a runner (shared state, resources)."""
    _check_asyncio(request)
    run: RunJob = request.getfixturevalue("_taskd_run")
    return run


@_async_fixture
async def _taskd_runner() -> AsyncIterator[RunnerFactory]:
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
async def _taskd_run(_taskd_runner: RunnerFactory) -> RunJob:
    runners: dict[Any, JobRunner] = {}

    async def run(
        job_type: str | JobType,
        options: Mapping[str, Any] | None = None,
        *,
        plugin: PluginLike | None = None,
        **settings: Any,
    ) -> RunReport:
        # A file by its path (str or Path alike), a module or other object by identity.
        key = os.fspath(plugin) if isinstance(plugin, str | os.PathLike) else id(plugin)
        runner = runners.get(key)
        if runner is None:
            plugins = () if plugin is None else (plugin,)
            # No plugin named: the installed ones, as the daemon loads by default.
            runner = runners[key] = _taskd_runner(*plugins, entry_points=plugin is None)
        return await runner.run(job_type, options, **settings)

    return run
