"""``taskd new-plugin NAME``: a plugin file with one job of each kind, and its tests.

Both pass as written: the plugin passes ``taskd check`` and ``mypy --strict``, the tests pass
under pytest (with pytest-asyncio, which the test file does not need configured: it marks
its tests itself). The test file sits beside the plugin; drop-in folders skip ``test_*.py``
(taskd.plugin.dropin.is_test_file), so the folder can be a ``plugin_dirs`` entry as it is."""

from __future__ import annotations

import argparse
import importlib.util
import keyword
import os
import re
import sys
from pathlib import Path

from taskd.cli.common import EXIT_FAIL, EXIT_OK

NAME = re.compile(r"[a-z][a-z0-9_]{0,29}")

PLUGIN = '''\
"""{name}: a taskd plugin with one job of each kind.

Drop this file into a folder listed in [daemon] plugin_dirs. Each job type's options are
its function's keyword parameters; the config's [jobs.<name>.options] table is checked
against their annotations when the config loads.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import taskd


async def hello(ctx: taskd.JobContext, who: str = "world") -> dict[str, Any]:
    """Greet someone; count the greetings in shared state (io: on the event loop)."""
    key = "{name}_greetings"
    async with ctx.state.locked() as state:  # shared state changes under its lock
        count = state[key] = state.get(key, 0) + 1
    ctx.log.info("greeted", who=who, count=count)
    return {{"hello": who, "count": count}}


def disk_free(path: str = "/", min_free_gib: float = 0.0) -> dict[str, Any]:
    """Report a filesystem's free space (blocking: a sync call, in the thread pool)."""
    free = shutil.disk_usage(path).free / 2**30
    if free < min_free_gib:
        raise RuntimeError(f"{{path}}: {{free:.1f}} GiB free (< {{min_free_gib}})")
    return {{"path": path, "free_gib": round(free, 2)}}


def digest(path: Path, algorithm: str = "sha256") -> dict[str, Any]:
    """Hash a file (cpu: in a worker process; arguments and result must pickle)."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {{"path": str(path), algorithm: h.hexdigest()}}


@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [
        taskd.JobType(
            "{name}_hello",
            hello,  # kind="io", the default, for an async def
        ),
        taskd.JobType(
            "{name}_disk_free",
            disk_free,
            kind="blocking",
        ),
        taskd.JobType(
            "{name}_digest",
            digest,
            kind="cpu",
        ),
    ]
'''

TESTS = '''\
"""Tests for the plugin beside this file: each job run as the daemon runs it.

Needs pytest and pytest-asyncio (pip install pytest pytest-asyncio); the fixtures
taskd_run and taskd_runner come with taskd. Run:

    pytest -v test_{name}.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from taskd.errors import ConfigError

# Async tests, whatever asyncio_mode the project sets (auto mode makes this unneeded).
pytestmark = pytest.mark.asyncio

PLUGIN = Path(__file__).with_name("{name}.py")


async def test_hello(taskd_run: Any) -> None:
    report = await taskd_run(
        "{name}_hello",
        {{"who": "tests"}},
        plugin=PLUGIN,
    )
    assert report.ok, report.error
    assert report.result == {{"hello": "tests", "count": 1}}
    assert report.kinds == ["started", "succeeded"]


async def test_hello_counts_in_shared_state(taskd_runner: Any) -> None:
    runner = taskd_runner(PLUGIN)
    await runner.run("{name}_hello")
    report = await runner.run("{name}_hello")
    assert report.result["count"] == 2
    assert runner.state.get("{name}_greetings") == 2


async def test_disk_free(taskd_run: Any, tmp_path: Path) -> None:
    report = await taskd_run(
        "{name}_disk_free",
        {{"path": str(tmp_path)}},
        plugin=PLUGIN,
    )
    assert report.ok, report.error
    assert report.result["free_gib"] >= 0


async def test_disk_free_fails_below_the_threshold(taskd_run: Any) -> None:
    report = await taskd_run(
        "{name}_disk_free",
        {{"min_free_gib": 1e12}},
        plugin=PLUGIN,
    )
    assert report.outcome == "failed"
    assert "GiB free" in (report.error or "")


async def test_digest_in_a_worker_process(taskd_run: Any, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"taskd" * 1000)
    report = await taskd_run(
        "{name}_digest",
        {{"path": str(data)}},
        plugin=PLUGIN,
        timeout="30s",  # a [jobs.<name>] setting, read as the config reads it
    )
    assert report.ok, report.error
    assert report.result["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


async def test_options_are_checked_like_the_config(taskd_run: Any) -> None:
    with pytest.raises(ConfigError, match="unknown option 'whom'"):
        await taskd_run(
            "{name}_hello",
            {{"whom": "x"}},
            plugin=PLUGIN,
        )
'''

NEXT = """\
wrote {plugin}
wrote {tests}

next:
  pytest {tests}
  add to your taskd.toml:

    [daemon]
    plugin_dirs = ["{folder}"]

    [jobs.{dash}-hello]
    type = "{name}_hello"
    every = "1m"

    [jobs.{dash}-disk]
    type = "{name}_disk_free"
    every = "5m"
    options = {{ path = "/", min_free_gib = 1.0 }}

    [jobs.{dash}-digest]
    type = "{name}_digest"
    every = "1h"
    options = {{ path = "/etc/hostname" }}

  then: taskd check; taskd exec {dash}-hello
"""


def _same_file(origin: str | None, plugin: Path) -> bool:
    try:
        return origin is not None and os.path.samefile(origin, plugin)
    except OSError:
        return False


def _name_problem(name: str, plugin: Path) -> str | None:
    """Why ``name`` cannot be the plugin's: its scaffold would not pass as written, or its
    file would never be loaded. None when it is usable."""
    if not NAME.fullmatch(name) or keyword.iskeyword(name) or name.startswith("test"):
        return (
            "use lower-case letters, digits and '_', starting with a letter, at most 30 "
            "characters, not a Python keyword and not starting with 'test' (drop-in folders "
            "skip test files)"
        )
    # Drop-in folders skip pytest's files (taskd.plugin.dropin.is_test_file): never loaded.
    if name == "conftest":
        return "drop-in folders skip 'conftest' files (pytest's), so the plugin would never load"
    if name.endswith("_test"):
        return "it ends with '_test': drop-in folders skip test files, so it would never load"
    # pytest puts the test file's folder first on sys.path, so NAME.py would be imported in
    # place of the module of that name, by pytest, taskd or the tests: they fail as written.
    if name in sys.stdlib_module_names:
        return f"{name}.py would shadow the standard library module {name!r}"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and not _same_file(spec.origin, plugin):  # not what --force overwrites
        where = f" ({spec.origin})" if spec.origin else ""
        return f"{name}.py would shadow the installed module {name!r}{where}"
    return None


def cmd_new_plugin(args: argparse.Namespace) -> int:
    name: str = args.name
    folder = Path(args.dir).absolute()
    plugin = folder / f"{name}.py"
    problem = _name_problem(name, plugin)
    if problem is not None:
        print(
            f"taskd: {name!r} is not a usable plugin name: {problem}; pick another, "
            f"e.g. 'disk_watch'",
            file=sys.stderr,
        )
        return EXIT_FAIL
    tests = folder / f"test_{name}.py"
    if not args.force:
        existing = [str(p) for p in (plugin, tests) if os.path.lexists(p)]
        if existing:
            print(
                f"taskd: {' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                f"pick another name, or pass --force to overwrite",
                file=sys.stderr,
            )
            return EXIT_FAIL
    try:
        folder.mkdir(parents=True, exist_ok=True)
        plugin.write_text(PLUGIN.format(name=name))
        tests.write_text(TESTS.format(name=name))
    except OSError as exc:
        print(f"taskd: cannot write the plugin: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(
        NEXT.format(
            plugin=plugin, tests=tests, folder=folder, name=name, dash=name.replace("_", "-")
        ),
        end="",
    )
    return EXIT_OK
