"""An io job whose run context is missing or not first is a clear error naming the function
and showing the fix, from ``taskd check`` and ``taskd plugins`` (real CLI, real files); not
the confusing "unknown option" it used to be."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.helpers import run_cli

CONFIG = """
[daemon]
plugin_dirs = ["plugins.d"]
state_dir = "state"
runtime_dir = "run"
entry_points = false

[jobs.f]
type = "fetch"
every = "1h"
[jobs.f.options]
url = "http://localhost/"
"""

CASES = {
    # No context at all: url took its place, so "url" used to be an unknown option.
    "missing": (
        "async def fetch(url: str, tries: int = 1) -> None: ...",
        ["fetch()", "first parameter 'url'", "async def fetch(ctx: taskd.JobContext, url"],
    ),
    "misplaced": (
        "async def fetch(url: str, ctx: taskd.JobContext) -> None: ...",
        ["fetch()", "'ctx'", "parameter 2", "async def fetch(ctx: taskd.JobContext, url"],
    ),
    "misplaced_unannotated": (
        "async def fetch(url: str, ctx) -> None: ...",
        ["fetch()", "'ctx'", "parameter 2"],
    ),
    "none": (
        "async def fetch() -> None: ...",
        ["fetch()", "takes no parameters", "async def fetch(ctx: taskd.JobContext"],
    ),
    "keyword_only": (
        "async def fetch(*, ctx: taskd.JobContext, url: str) -> None: ...",
        ["fetch()", "'ctx'", "positional"],
    ),
    "defaulted": (
        "async def fetch(url: str = 'x') -> None: ...",
        ["fetch()", "first parameter 'url'", "default"],
    ),
}


def _write(root: Path, func: str) -> Path:
    plugins = root / "plugins.d"
    plugins.mkdir(parents=True)
    source = f"""
import taskd

{func}

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("fetch", fetch)]
"""
    (plugins / "web.py").write_text(textwrap.dedent(source))
    config = root / "taskd.toml"
    config.write_text(textwrap.dedent(CONFIG).lstrip())
    return config


class TestContextParameter:
    """taskd check names the function, its file and line, and shows the signature to write."""

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_check_names_the_function(self, tmp_path: Path, case: str) -> None:
        func, fragments = CASES[case]
        config = _write(tmp_path, func)
        result = run_cli("check", "-c", str(config))
        assert result.returncode == 1
        assert "unknown option" not in result.stderr
        assert "missing required option" not in result.stderr
        for fragment in fragments:
            assert fragment in result.stderr, result.stderr
        assert "web.py:4" in result.stderr  # where the function is defined
        assert "Traceback" not in result.stderr

    def test_plugins_shows_it_too(self, tmp_path: Path) -> None:
        config = _write(tmp_path, CASES["missing"][0])
        result = run_cli("plugins", "-c", str(config))
        assert result.returncode == 1
        assert "first parameter 'url'" in result.stdout

    @pytest.mark.parametrize(
        "func",
        [
            "async def fetch(ctx: taskd.JobContext, url: str) -> None: ...",
            "async def fetch(ctx, url: str) -> None: ...",
            "async def fetch(c, url: str) -> None: ...",
            "async def fetch(ctx: 'taskd.JobContext', /, url: str) -> None: ...",
            "async def fetch(ctx: 'JobContext', url: str) -> None: ...  # TYPE_CHECKING import",
            # Options typed loosely are options, not a misplaced context.
            "async def fetch(ctx, url: str, deep: object = None, more: 'object' = 1) -> None: ...",
            "async def fetch(ctx: object, url: str, context: str = '') -> None: ...",
        ],
    )
    def test_good_signatures_pass(self, tmp_path: Path, func: str) -> None:
        config = _write(tmp_path, func)
        result = run_cli("check", "-c", str(config))
        assert result.returncode == 0, result.stderr


TYPED_CONFIG = """
[daemon]
plugin_dirs = ["plugins.d"]
state_dir = "state"
runtime_dir = "run"
entry_points = false

[jobs.f]
type = "fetch"
every = "1h"
[jobs.f.options]
check = { url = "http://localhost/" }

[jobs.g]
type = "other"
every = "1h"
"""

# Annotations that `issubclass` refuses (TypedDict, a Protocol that is not runtime_checkable,
# one with data members) used to raise out of the context check and break the whole plugin,
# every job type in it: "taskd_job_types() failed: TypeError: TypedDict does not support
# instance and class checks".
TYPED_FUNCS = {
    "typeddict_option": "async def fetch(ctx: taskd.JobContext, check: Check) -> None: ...",
    "typeddict_option_or_none": (
        "async def fetch(ctx: taskd.JobContext, check: Check | None = None) -> None: ..."
    ),
    "typeddict_list_option": (
        "async def fetch(ctx: taskd.JobContext, check: Check, more: list[Check] | None = None)"
        " -> None: ..."
    ),
    "protocol_context": "async def fetch(ctx: HasJob, check: Check) -> None: ...",
    "runtime_protocol_with_data_context": (
        "async def fetch(ctx: RuntimeHasJob, check: Check) -> None: ..."
    ),
}


def _write_typed(root: Path, func: str) -> Path:
    plugins = root / "plugins.d"
    plugins.mkdir(parents=True)
    source = f"""
from typing import NotRequired, Protocol, TypedDict, runtime_checkable

import taskd


class Check(TypedDict):
    url: str
    status: NotRequired[int]


class HasJob(Protocol):
    job: str


@runtime_checkable
class RuntimeHasJob(Protocol):
    job: str


{func}


async def other(ctx: taskd.JobContext) -> None: ...


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("fetch", fetch), taskd.JobType("other", other)]
"""
    (plugins / "web.py").write_text(textwrap.dedent(source))
    config = root / "taskd.toml"
    config.write_text(textwrap.dedent(TYPED_CONFIG).lstrip())
    return config


class TestAnnotationsIssubclassRefuses:
    """A TypedDict option or a Protocol-typed context is judged without ``issubclass``
    raising: the plugin loads, every job type in it, and its options are checked."""

    @pytest.mark.parametrize("case", sorted(TYPED_FUNCS))
    def test_plugin_loads(self, tmp_path: Path, case: str) -> None:
        config = _write_typed(tmp_path, TYPED_FUNCS[case])
        result = run_cli("check", "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert "TypeError" not in result.stderr + result.stdout

    def test_typeddict_option_still_checked_key_by_key(self, tmp_path: Path) -> None:
        config = _write_typed(tmp_path, TYPED_FUNCS["typeddict_option"])
        config.write_text(config.read_text().replace('{ url = "http', '{ stauts = 1, url = "http'))
        result = run_cli("check", "-c", str(config))
        assert result.returncode == 1
        assert "stauts" in result.stderr, result.stderr
        assert "TypeError" not in result.stderr

    def test_typeddict_list_or_none_option_names_the_key(self, tmp_path: Path) -> None:
        # A `list[Check] | None` option used to say only "expected list[Check] | None, got an
        # array" for a key typo in one of its tables.
        config = _write_typed(tmp_path, TYPED_FUNCS["typeddict_list_option"])
        text = config.read_text().replace(
            'check = { url = "http://localhost/" }',
            'check = { url = "http://localhost/" }\nmore = [{ url = "u" }, { url = "v", stauts = 1 }]',
        )
        config.write_text(text)
        result = run_cli("check", "-c", str(config))
        assert result.returncode == 1
        assert "item 1: unknown key 'stauts' in a Check table (did you mean 'status'?)" in (
            result.stderr
        ), result.stderr
