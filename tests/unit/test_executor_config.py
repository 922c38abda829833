"""The ``executor`` job key and the executors' tables: checked when job types resolve, each
mistake a config issue naming its key; a job on a plugin's executor runs there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

import taskd
from taskd.config.load import load_config
from taskd.config.model import JobConfig
from taskd.errors import ConfigError
from taskd.plugin.jobtype import JobType, Kind
from taskd.plugin.manager import PluginHost
from taskd.plugin.resolve import resolve
from taskd.run.encoding import Encoded, encode
from taskd.run.executor import Call, ExecutorRegistry, ExecutorSettings, Problem
from taskd.testing import JobRunner


def crunch(n: int = 3) -> dict[str, Any]:
    return {"n": n, "where": "inline"}


def wait(path: str = "/") -> None: ...


async def fetch(ctx: Any) -> None: ...


class Inline:
    """A plugin's cpu executor that runs the call right here and says so in the result."""

    name: ClassVar[str] = "inline"
    kinds: ClassVar[frozenset[Kind]] = frozenset({"cpu"})
    calls: ClassVar[list[Call]] = []

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings

    @classmethod
    def check_table(cls, table: Mapping[str, Any]) -> list[Problem]:
        return [(k, f"unknown key {k!r}", "inline takes only 'tag'") for k in table if k != "tag"]

    @classmethod
    def validate(cls, job: JobConfig, jobtype: JobType) -> list[Problem]:
        if job.max_memory is not None:
            return [("max_memory", "max_memory is not supported by the inline executor", None)]
        return []

    async def start(self) -> None:
        return None

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        type(self).calls.append(call)
        result = {**call.func(**call.kwargs), "tag": self.settings.table.get("tag")}
        return result, encode(result, call.max_result)

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        return None

    def gauges(self) -> Mapping[str, float]:
        return {}


class Plugin:
    @taskd.hookimpl
    def taskd_job_types(self) -> list[JobType]:
        return [
            JobType("crunch", crunch, kind="cpu"),
            JobType("wait", wait, kind="blocking"),
            JobType("fetch", fetch, kind="io"),
        ]

    @taskd.hookimpl
    def taskd_executors(self, register: ExecutorRegistry) -> None:
        register.add(Inline)


@pytest.fixture
def host() -> PluginHost:
    return PluginHost.load([], entry_points=False, extra=[Plugin()])


def _resolve(tmp_path: Path, host: PluginHost, text: str) -> tuple[Any, list[Any]]:
    path = tmp_path / "taskd.toml"
    path.write_text(textwrap.dedent(text))
    return resolve(load_config(path), host)


def test_a_job_on_a_plugin_executor(tmp_path: Path, host: PluginHost) -> None:
    specs, issues = _resolve(
        tmp_path,
        host,
        """
        [executors.inline]
        tag = "t1"
        [jobs.a]
        type = "crunch"
        every = "1m"
        executor = "inline"
        [jobs.b]
        type = "crunch"
        every = "1m"
        executor = "process"
        [jobs.c]
        type = "wait"
        every = "1m"
        """,
    )
    assert issues == []
    assert specs["a"].executor == "inline"
    assert specs["b"].executor is None  # its kind's default: the runner's direct path
    assert specs["c"].executor is None


class Raising(Inline):
    """A plugin executor whose load-time checks raise (a bug in its plugin)."""

    name: ClassVar[str] = "raising"

    @classmethod
    def check_table(cls, table: Mapping[str, Any]) -> list[Problem]:
        raise RuntimeError("check_table blew up")

    @classmethod
    def validate(cls, job: JobConfig, jobtype: JobType) -> list[Problem]:
        if job.name == "v":
            raise RuntimeError("validate blew up")
        return []


class RaisingPlugin(Plugin):
    @taskd.hookimpl
    def taskd_executors(self, register: ExecutorRegistry) -> None:
        register.add(Raising)


def test_an_executor_whose_checks_raise_is_a_config_issue(tmp_path: Path) -> None:
    host = PluginHost.load([], entry_points=False, extra=[RaisingPlugin()])
    specs, issues = _resolve(
        tmp_path,
        host,
        """
        [jobs.v]
        type = "crunch"
        every = "1m"
        executor = "raising"
        [jobs.t]
        type = "crunch"
        every = "1m"
        executor = "raising"
        [jobs.fine]
        type = "crunch"
        every = "1m"
        """,
    )
    assert "v" not in specs and "t" not in specs
    assert "fine" in specs
    found = sorted((i.path, i.message) for i in issues)
    assert found == [
        (
            "executors.raising",
            "executor 'raising' failed to check its table: RuntimeError: check_table blew up",
        ),
        (
            "jobs.v.executor",
            "executor 'raising' failed to check the job: RuntimeError: validate blew up",
        ),
    ]


def test_unknown_executor_suggests(tmp_path: Path, host: PluginHost) -> None:
    specs, issues = _resolve(
        tmp_path, host, '[jobs.a]\ntype = "crunch"\nevery = "1m"\nexecutor = "inlin"\n'
    )
    assert "a" not in specs
    ((path, message, hint),) = [(i.path, i.message, i.hint) for i in issues]
    assert path == "jobs.a.executor"
    assert message == "unknown executor 'inlin'"
    assert hint == "did you mean 'inline'?"
    assert issues[0].line == 4


def test_an_executor_of_another_kind(tmp_path: Path, host: PluginHost) -> None:
    _, issues = _resolve(
        tmp_path, host, '[jobs.a]\ntype = "wait"\nevery = "1m"\nexecutor = "inline"\n'
    )
    ((path, message, hint),) = [(i.path, i.message, i.hint) for i in issues]
    assert path == "jobs.a.executor"
    assert message == "the 'inline' executor runs cpu jobs; 'wait' is a blocking job"
    assert hint == "remove executor: blocking jobs run on 'thread'"
    _, issues = _resolve(
        tmp_path, host, '[jobs.a]\ntype = "fetch"\nevery = "1m"\nexecutor = "process"\n'
    )
    assert [i.message for i in issues] == [
        "the 'process' executor runs cpu jobs; 'fetch' is a io job"
    ]


def test_validate_rejects_an_option_the_executor_cannot_honour(
    tmp_path: Path, host: PluginHost
) -> None:
    _, issues = _resolve(
        tmp_path,
        host,
        '[jobs.a]\ntype = "crunch"\nevery = "1m"\nexecutor = "inline"\nmax_memory = "1GiB"\n',
    )
    assert [(i.path, i.message) for i in issues] == [
        ("jobs.a.max_memory", "max_memory is not supported by the inline executor")
    ]


def test_the_table_is_checked_once_for_all_its_jobs(tmp_path: Path, host: PluginHost) -> None:
    jobs = "".join(
        f'[jobs.j{i}]\ntype = "crunch"\nevery = "1m"\nexecutor = "inline"\n' for i in range(3)
    )
    specs, issues = _resolve(tmp_path, host, f"[executors.inline]\ntga = 1\n{jobs}")
    assert [(i.path, i.message) for i in issues] == [("executors.inline.tga", "unknown key 'tga'")]
    assert specs == {}


def test_a_table_no_executor_reads(tmp_path: Path, host: PluginHost) -> None:
    _, issues = _resolve(tmp_path, host, "[executors.inlin]\ntag = 1\n")
    assert [(i.path, i.message, i.hint) for i in issues] == [
        ("executors.inlin", "no executor named 'inlin' is registered", "did you mean 'inline'?")
    ]


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("dask = 3\n", "dask", "expected a table [dask], got an integer"),
        ('executors = "x"\n', "executors", "expected tables [executors.<name>], got a string"),
        ("[executors]\ninline = 2\n", "executors.inline", "expected a table [executors.inline]"),
        ('[jobs.a]\ntype = "crunch"\nevery = "1m"\nexecutor = 1\n', "jobs.a.executor", "string"),
        ("[dusk]\n", "dusk", "unknown top-level key 'dusk'"),
    ],
)
def test_shape_errors(tmp_path: Path, text: str, path: str, message: str) -> None:
    file = tmp_path / "taskd.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    (issue,) = caught.value.issues
    assert issue.path == path
    assert message in issue.message


async def test_a_run_goes_to_the_named_executor() -> None:
    Inline.calls.clear()
    async with JobRunner(Plugin()) as kit:
        report = await kit.run("crunch", {"n": 5}, executor="inline", timeout="7s")
        default = await kit.run("crunch", {"n": 1})
    assert report.result == {"n": 5, "where": "inline", "tag": None}
    (call,) = Inline.calls  # the default run went to the process pool, not here
    assert call.timeout == 7.0
    assert call.key.endswith("-1")
    assert default.result == {"n": 1, "where": "inline"}


async def test_the_kit_refuses_an_unknown_executor() -> None:
    async with JobRunner(Plugin()) as kit:
        with pytest.raises(ConfigError, match="unknown executor 'nope'"):
            kit.spec("crunch", executor="nope")


# -- [dask] ------------------------------------------------------------------------------

DASK_JOB = '[jobs.d]\ntype = "crunch"\nevery = "1m"\nexecutor = "dask"\n'


@pytest.mark.parametrize(
    ("table", "path", "message", "hint"),
    [
        ("", "dask.scheduler", "missing 'scheduler'", 'set scheduler = "local"'),
        ('scheduler = "dask:8786"', "dask.scheduler", 'expected "local" or a tcp://', None),
        ('scheduler = "local"\nworkers = 0', "dask.workers", "must be from 1 to 256", None),
        ('scheduler = "local"\nworkers = "2"', "dask.workers", "expected a whole number", None),
        (
            'scheduler = "tcp://h:8786"\nworkers = 2',
            "dask.workers",
            "'workers' applies to scheduler = \"local\" only",
            "remove workers",
        ),
        ('scheduler = "local"\nconnect_timeout = "soon"', "dask.connect_timeout", "", None),
        ('scheduler = "tcp://h"', "dask.scheduler", 'expected "local" or a tcp://', None),
        ('scheduler = "tcp://a b c"', "dask.scheduler", 'expected "local" or a tcp://', None),
        ('scheduler = "tcp://h:0"', "dask.scheduler", 'expected "local" or a tcp://', None),
        ('scheduler = "tcp://h:86x"', "dask.scheduler", 'expected "local" or a tcp://', None),
        ('scheduler = "tcp://:8786"', "dask.scheduler", 'expected "local" or a tcp://', None),
        (
            'scheduler = "local"\nconnect_timeout = "9999d"',
            "dask.connect_timeout",
            "must be at most 10m",
            None,
        ),
        (
            'scheduler = "local"\nconect_timeout = "1s"',
            "dask.conect_timeout",
            "unknown key",
            "did you mean 'connect_timeout'?",
        ),
    ],
)
def test_dask_table_errors(
    tmp_path: Path, host: PluginHost, table: str, path: str, message: str, hint: str | None
) -> None:
    _, issues = _resolve(tmp_path, host, f"[dask]\n{table}\n{DASK_JOB}")
    (issue,) = issues
    assert issue.path == path
    assert message in issue.message
    if hint is not None:
        assert hint in (issue.hint or "")


@pytest.mark.parametrize(
    "scheduler", ["tcp://dask-scheduler:8786", "tcp://10.0.0.5:8786", "tcp://[::1]:8786"]
)
def test_dask_scheduler_addresses(tmp_path: Path, host: PluginHost, scheduler: str) -> None:
    _, issues = _resolve(tmp_path, host, f'[dask]\nscheduler = "{scheduler}"\n{DASK_JOB}')
    assert issues == []


def test_a_bad_dask_table_is_an_error_with_no_dask_job(tmp_path: Path, host: PluginHost) -> None:
    _, issues = _resolve(tmp_path, host, '[dask]\nscheduler = "nope"\nbogus = 1\n')
    assert sorted(i.path for i in issues) == ["dask.bogus", "dask.scheduler"]


@pytest.mark.parametrize(
    ("table", "hint"),
    [
        ("[executors.process]\nworkers = 8\n", "[daemon] process_workers"),
        ("[executors.thread]\nmax = 99\n", "[daemon] thread_workers"),
        ("[executors.loop]\nanything = 1\n", "io runs on the event loop"),
    ],
)
def test_the_builtins_take_no_table(
    tmp_path: Path, host: PluginHost, table: str, hint: str
) -> None:
    (issue,) = _resolve(tmp_path, host, table)[1]
    name = table.partition(".")[2].partition("]")[0]
    key = table.splitlines()[1].partition(" ")[0]
    assert issue.path == f"executors.{name}.{key}"
    assert issue.message == f"unknown key {key!r}: the {name!r} executor takes no settings"
    assert hint in (issue.hint or "")


def test_executors_dask_says_where_dask_settings_go(tmp_path: Path, host: PluginHost) -> None:
    text = f'[dask]\nscheduler = "local"\n[executors.dask]\nscheduler = "tcp://x:1"\n{DASK_JOB}'
    (issue,) = _resolve(tmp_path, host, text)[1]
    assert issue.path == "executors.dask"
    assert issue.message == "the 'dask' executor's table is [dask], not [executors.dask]"
    assert issue.hint == "move these keys to [dask]"


def test_a_dask_job_without_a_dask_table(tmp_path: Path, host: PluginHost) -> None:
    _, issues = _resolve(tmp_path, host, DASK_JOB)
    assert [i.path for i in issues] == ["dask.scheduler"]


def test_dask_refuses_max_memory(tmp_path: Path, host: PluginHost) -> None:
    _, issues = _resolve(
        tmp_path, host, f'[dask]\nscheduler = "local"\n{DASK_JOB}max_memory = "1GiB"\n'
    )
    (issue,) = issues
    assert issue.path == "jobs.d.max_memory"
    assert issue.message.startswith("max_memory is not supported by the dask executor")
    assert issue.hint == 'remove max_memory, or run the job on executor = "process"'


def test_only_cpu_jobs_may_use_dask(tmp_path: Path, host: PluginHost) -> None:
    _, issues = _resolve(
        tmp_path,
        host,
        '[dask]\nscheduler = "local"\n[jobs.w]\ntype = "wait"\nevery = "1m"\nexecutor = "dask"\n',
    )
    assert [(i.path, i.message) for i in issues] == [
        ("jobs.w.executor", "the 'dask' executor runs cpu jobs; 'wait' is a blocking job")
    ]


def test_a_good_dask_config_resolves_without_importing_distributed(
    tmp_path: Path, host: PluginHost
) -> None:
    specs, issues = _resolve(
        tmp_path,
        host,
        f'[dask]\nscheduler = "tcp://127.0.0.1:8786"\nconnect_timeout = "3s"\n{DASK_JOB}',
    )
    assert issues == []
    assert specs["d"].executor == "dask"
    # Checking the config imports the executor's module, never distributed: asked in a
    # fresh interpreter (a test before this one may have imported it in this process).
    code = (
        "import sys; from taskd.run.executor.dask import DaskExecutor; "
        "DaskExecutor.check_table({'scheduler': 'local'}); "
        "print('distributed' in sys.modules, 'dask' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
