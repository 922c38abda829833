"""Check a job's ``options`` table against its function's parameters and annotations.

Hand-written rather than a validation library: TOML values are a small closed set (str, int,
float, bool, datetime, array, table), and the errors must name the config key path."""

from __future__ import annotations

import collections.abc as cabc
import datetime as dt
import inspect
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any

from taskd.config.load import type_name as _tname
from taskd.plugin.jobtype import JobType


def _hint_text(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def check_value(value: Any, hint: Any) -> str | None:
    """None when ``value`` fits ``hint``, else what was expected. Unknown hints accept anything."""
    if hint is Any or hint is inspect.Parameter.empty or hint is object:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None) and check_value(value, arg) is None:
                return None
        return f"expected {_hint_text(hint)}, got {_tname(value)}"
    if origin is typing.Literal:
        # Compare the type too: True == 1 and 1 == 1.0 in Python, but not in a config.
        if any(value == a and type(value) is type(a) for a in args):
            return None
        return f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}"
    if origin in (
        list,
        cabc.Sequence,
        cabc.Iterable,
        cabc.Collection,
        tuple,
        set,
        frozenset,
        cabc.Set,
    ):
        if not isinstance(value, list):
            return f"expected an array ({_hint_text(hint)}), got {_tname(value)}"
        if args and origin is not tuple:
            for i, item in enumerate(value):
                problem = check_value(item, args[0])
                if problem:
                    return f"item {i}: {problem}"
        return None
    if origin in (dict, cabc.Mapping, cabc.MutableMapping):
        if not isinstance(value, dict):
            return f"expected a table ({_hint_text(hint)}), got {_tname(value)}"
        if len(args) == 2:
            for k, v in value.items():
                problem = check_value(v, args[1])
                if problem:
                    return f"key {k!r}: {problem}"
        return None
    if origin is not None:
        return None  # a generic we do not know: let the job check it
    if hint is type(None):
        return None if value is None else f"expected nothing, got {_tname(value)}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {_tname(value)}"
    if hint is int:
        return (
            None
            if isinstance(value, int) and not isinstance(value, bool)
            else f"expected an integer, got {_tname(value)}"
        )
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {_tname(value)}"
    if hint is str or hint is pathlib.Path or hint is pathlib.PurePath:
        return None if isinstance(value, str) else f"expected a string, got {_tname(value)}"
    if hint in (list, tuple, set, frozenset):
        return None if isinstance(value, list) else f"expected an array, got {_tname(value)}"
    if hint is dict:
        return None if isinstance(value, dict) else f"expected a table, got {_tname(value)}"
    if hint in (dt.datetime, dt.date, dt.time):
        return (
            None
            if isinstance(value, hint)
            else f"expected a TOML {hint.__name__}, got {_tname(value)}"
        )
    return None


def _convert(value: Any, hint: Any) -> Any:
    if hint is pathlib.Path or hint is pathlib.PurePath:
        return pathlib.Path(value) if isinstance(value, str) else value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None:
            return None
        for arg in args:
            if arg is not type(None) and check_value(value, arg) is None:
                return _convert(value, arg)
        return value
    if origin in (list, tuple, cabc.Sequence) and isinstance(value, list) and args:
        items = [_convert(v, args[0]) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is tuple and isinstance(value, list):
        return tuple(value)
    return value


def convert_options(jt: JobType, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments for the call: checked options converted to what the annotations
    promise (a ``Path`` parameter gets a Path, not the TOML string)."""
    try:
        hints = typing.get_type_hints(jt.func)
    except Exception:
        return dict(options)
    return {k: _convert(v, hints[k]) if k in hints else v for k, v in options.items()}


def signature_problem(jt: JobType) -> str | None:
    """Why this job type's function cannot be called with options, if it cannot."""
    params = _params(jt)
    for p in params:
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty:
            return f"parameter {p.name!r} is positional-only; options are passed by keyword"
    if jt.kind == "io":
        try:
            first = next(iter(inspect.signature(jt.func).parameters.values()))
        except (StopIteration, ValueError, TypeError):
            return "an io job function takes the run context as its first parameter"
        if first.kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            return "an io job function takes the run context as its first (positional) parameter"
    return None


def _params(jt: JobType) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(jt.func).parameters.values())
    except (ValueError, TypeError):
        return []
    return params[1:] if jt.kind == "io" and params else params


def check_options(jt: JobType, options: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """Problems as (option name or "", message, hint); empty when the options fit."""
    from taskd.config.load import suggest

    problems: list[tuple[str, str, str | None]] = []
    params = _params(jt)
    try:
        hints = typing.get_type_hints(jt.func)
    except Exception:  # an annotation that does not resolve must not break loading
        hints = {}
    by_name = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    for key, value in options.items():
        param = by_name.get(key)
        if param is None:
            if not takes_any:
                known = ", ".join(by_name) or "none"
                problems.append(
                    (
                        key,
                        f"unknown option {key!r} for job type {jt.name!r}",
                        suggest(key, by_name) or f"its options: {known}",
                    )
                )
            continue
        problem = check_value(value, hints.get(key, param.annotation))
        if problem:
            problems.append((key, problem, None))
    for name, param in by_name.items():
        if param.default is inspect.Parameter.empty and name not in options:
            hint = (
                _hint_text(hints.get(name, param.annotation))
                if param.annotation is not inspect.Parameter.empty
                else "value"
            )
            problems.append(
                (name, f"missing required option {name!r} ({hint}) for job type {jt.name!r}", None)
            )
    return problems


def describe_options(jt: JobType) -> list[dict[str, Any]]:
    """Name, type and default of each option, for ``taskd plugins``."""
    try:
        hints = typing.get_type_hints(jt.func)
    except Exception:
        hints = {}
    out = []
    for p in _params(jt):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(p.name, p.annotation)
        out.append(
            {
                "name": p.name,
                "type": None if hint is inspect.Parameter.empty else _hint_text(hint),
                "required": p.default is inspect.Parameter.empty,
                "default": None if p.default is inspect.Parameter.empty else repr(p.default),
            }
        )
    return out
