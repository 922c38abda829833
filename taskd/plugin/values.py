"""Whether one TOML value fits a parameter's annotation, and converting it to what the
annotation promises (a ``Path`` for a string, an Enum member for its value).

Hand-written rather than a validation library: TOML values are a small closed set (str, int,
float, bool, datetime, array, table), and the errors must name the config key path."""

from __future__ import annotations

import collections.abc as cabc
import datetime as dt
import enum
import inspect
import os
import pathlib
import types
import typing
from typing import Any

from taskd.config.checks import type_name as _tname
from taskd.config.durations import parse_duration


def _hint_text(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    text = str(hint).replace("typing.", "")
    # A table class inside a generic prints with its module (a drop-in's is synthetic).
    for table in _tables_in(hint):
        text = text.replace(f"{table.__module__}.{table.__qualname__}", table.__name__)
    return text


def _tables_in(hint: Any) -> list[Any]:
    found = [hint] if typing.is_typeddict(hint) else []
    for arg in typing.get_args(hint):
        found.extend(_tables_in(arg))
    return found


def _fields(hint: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """A TypedDict's keys with their resolved annotations, and the required keys.

    Required keys are worked out from the resolved annotations: under ``from __future__ import
    annotations`` Python 3.11 cannot see ``Required[...]`` in a string and gets them wrong.
    Raises TypeError naming the class when an annotation cannot be resolved."""
    try:
        raw = typing.get_type_hints(hint, include_extras=True)
    except Exception as exc:
        raise TypeError(
            f"the annotations of {hint.__qualname__} cannot be resolved "
            f"({type(exc).__name__}: {exc}); import the names it uses at module level"
        ) from None
    fields: dict[str, Any] = {}
    required: set[str] = set()
    for key, ann in raw.items():
        marker = typing.get_origin(ann)
        if marker is typing.Required or (hint.__total__ and marker is not typing.NotRequired):
            required.add(key)
        while typing.get_origin(ann) in (typing.Required, typing.NotRequired, typing.Annotated):
            ann = typing.get_args(ann)[0]
        fields[key] = ann
    return fields, frozenset(required)


def _check_table(value: Any, hint: Any) -> str | None:
    """A TOML table against a TypedDict: known keys only, required ones present, each typed."""
    from taskd.config.checks import suggest

    if not isinstance(value, dict):
        return f"expected a table ({hint.__name__}), got {_tname(value)}"
    try:
        fields, required = _fields(hint)
    except TypeError as exc:
        return str(exc)
    for key, item in value.items():
        if key not in fields:
            hint_text = suggest(key, fields) or f"its keys: {', '.join(fields)}"
            return f"unknown key {key!r} in a {hint.__name__} table ({hint_text})"
        problem = check_value(item, fields[key])
        if problem:
            return f"key {key!r}: {problem}"
    missing = [k for k in fields if k in required and k not in value]
    if missing:
        return f"missing key {missing[0]!r} in a {hint.__name__} table"
    return None


_ARRAYS = (list, tuple, set, frozenset, cabc.Sequence, cabc.Iterable, cabc.Collection, cabc.Set)
_TABLES = (dict, cabc.Mapping, cabc.MutableMapping)


def _container(value: Any) -> str | None:
    """The kind of container a config value is: "table", "array", or None for a scalar."""
    return "table" if isinstance(value, dict) else "array" if isinstance(value, list) else None


def _container_hint(hint: Any) -> str | None:
    """The kind of container a union member takes ("table", "array"), or None for others."""
    if typing.is_typeddict(hint):
        return "table"
    base = typing.get_origin(hint) or hint
    if base in _TABLES:
        return "table"
    if base in _ARRAYS:
        return "array"
    return None


def check_value(value: Any, hint: Any) -> str | None:
    """None when ``value`` fits ``hint``, else what was expected. Unknown hints accept anything."""
    if hint is Any or hint is inspect.Parameter.empty or hint is object:
        return None
    if typing.is_typeddict(hint):
        return _check_table(value, hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None) and check_value(value, arg) is None:
                return None
        # A table or array that matched no member: when exactly one member takes that kind
        # of value, its own complaint (the item, an unknown key with a suggestion) says more
        # than "expected list[Check] | None, got an array".
        kind = _container(value)
        if kind is not None:
            takers = [a for a in args if _container_hint(a) == kind]
            if len(takers) == 1:
                return check_value(value, takers[0])
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
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):  # tuple[int, str]: exactly these items
                return (
                    f"expected an array of {len(args)} items ({_hint_text(hint)}), got {len(value)}"
                )
            item_hints = list(args)
        else:
            item_hints = [args[0]] * len(value) if args else []
        for i, (item, item_hint) in enumerate(zip(value, item_hints, strict=False)):
            problem = check_value(item, item_hint)
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
    if origin is os.PathLike:  # os.PathLike[str]
        return None if isinstance(value, str) else f"expected a path string, got {_tname(value)}"
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
    if hint is dt.date:  # a datetime is a date to Python, not to a config
        ok = isinstance(value, dt.date) and not isinstance(value, dt.datetime)
        return None if ok else f"expected a TOML date, got {_tname(value)}"
    if hint in (dt.datetime, dt.time):
        return (
            None
            if isinstance(value, hint)
            else f"expected a TOML {hint.__name__}, got {_tname(value)}"
        )
    if hint is dt.timedelta:
        try:
            parse_duration(value)
        except ValueError as exc:
            return str(exc)
        return None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if any(value == a and type(value) is type(a) for a in allowed):
            return None
        return f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
    if hint is os.PathLike:
        return None if isinstance(value, str) else f"expected a path string, got {_tname(value)}"
    if isinstance(hint, type):
        # Any other class: a TOML value has to be one already (bytes, Decimal: it never is).
        try:
            ok = isinstance(value, hint)
        except TypeError:  # TypedDict, a Protocol that is not runtime-checkable: let it be
            return None
        return None if ok else f"expected {hint.__name__}, got {_tname(value)}"
    return None


def _convert(value: Any, hint: Any) -> Any:
    if typing.is_typeddict(hint) and isinstance(value, dict):
        fields, _ = _fields(hint)
        return {k: _convert(v, fields[k]) if k in fields else v for k, v in value.items()}
    if (
        hint in (pathlib.Path, pathlib.PurePath, os.PathLike)
        or typing.get_origin(hint) is os.PathLike
    ):
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
    if isinstance(value, list) and origin in (list, tuple, set, frozenset, cabc.Sequence, cabc.Set):
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = [_convert(v, h) for v, h in zip(value, args, strict=False)]
        else:
            items = [_convert(v, args[0]) for v in value] if args else list(value)
        if origin is tuple:
            return tuple(items)
        if origin in (set, cabc.Set):
            return set(items)
        return frozenset(items) if origin is frozenset else items
    if isinstance(value, list) and hint in (tuple, set, frozenset):
        return hint(value)
    if hint is dt.timedelta and not isinstance(value, dt.timedelta):
        return dt.timedelta(seconds=parse_duration(value))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    return value
