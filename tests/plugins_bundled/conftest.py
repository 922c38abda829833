"""Fixtures for the bundled plugins in plugins/, which are drop-in files, not a package.

Each is loaded by path under a synthetic module name and registered in sys.modules, as the
daemon does with its drop-in folder, so pickling a cpu job's function by reference works.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pluggy
import pytest

import taskd
from taskd.plugin import hookspecs

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"

LoadPlugin = Callable[[str], types.ModuleType]


def module_name(plugin: str) -> str:
    return f"_taskd_dropin_{plugin}_test"


def load_dropin(path: Path, name: str) -> types.ModuleType:
    """Import the file at ``path`` as module ``name`` and register it in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before exec, as import does, so the module can be found while it runs.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture
def load_plugin() -> Iterator[LoadPlugin]:
    """A factory: ``load_plugin("checksum")`` loads plugins/checksum.py; unloaded afterwards."""
    loaded: list[str] = []

    def load(plugin: str) -> types.ModuleType:
        name = module_name(plugin)
        loaded.append(name)
        return load_dropin(PLUGINS_DIR / f"{plugin}.py", name)

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


def _registered_job_types(module: types.ModuleType) -> list[taskd.JobType]:
    """Register ``module`` with a real pluggy manager and collect its job types via the hook."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(module)
    return [jt for batch in pm.hook.taskd_job_types() for jt in batch]


# What a TOML options table can hold, as the annotations the daemon checks options against.
_TOML_ANNOTATIONS = {
    str,
    int,
    float,
    bool,
    list[str],
    list[int],
    dict[str, str],
    str | None,
    float | None,
    list[str] | None,
    dict[str, str] | None,
    str | int | float,
    int | None,
    dt.timedelta,
    # sql_query's params: any scalar TOML has.
    list[str | int | float | bool | dt.datetime | dt.date | dt.time] | None,
}


def _toml_hint(ann: object) -> bool:
    """An annotation built of TOML types: those above, unions, lists, str-keyed dicts, durations
    (timedelta), Literal, and TypedDict tables of them (the daemon checks each key)."""
    if ann in _TOML_ANNOTATIONS or ann in (type(None), dt.timedelta):
        return True
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return True
    if typing.is_typeddict(ann):
        return all(_toml_hint(h) for h in typing.get_type_hints(ann).values())
    if origin in (typing.Union, types.UnionType, list):
        return all(_toml_hint(a) for a in args)
    if origin is dict:
        return args[0] is str and _toml_hint(args[1])
    return False


def _assert_options_contract(job: taskd.JobType) -> None:
    """Every option is keyword-passable and annotated with a TOML-compatible type; the docstring
    starts with a one-line description."""
    params = list(inspect.signature(job.func).parameters.values())
    if job.kind == "io":
        assert params[0].annotation is taskd.JobContext
        params = params[1:]
    for p in params:
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, p.name
        ann = p.annotation
        ok = typing.get_origin(ann) is typing.Literal or _toml_hint(ann)
        assert ok, f"{job.name}.{p.name}: {ann!r} is not a TOML-compatible annotation"
    assert job.description
    assert "\n" not in job.description


@pytest.fixture
def job_types() -> Callable[[types.ModuleType], list[taskd.JobType]]:
    """Register a module with a real pluggy manager and return the job types its hook gave."""
    return _registered_job_types


@pytest.fixture
def options_contract() -> Callable[[taskd.JobType], None]:
    """Assert a job type's options are all annotated with TOML types and it has a description."""
    return _assert_options_contract
