"""An io job function's run context parameter: present, first and positional.

Checked when a plugin's job types are collected, so a missing or misplaced ``ctx`` is an
error naming the function and showing the signature to write, instead of its options being
shifted by one ("unknown option 'url'", "missing required option 'ctx'")."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any


def _hint_text(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


_CONTEXT_NAMES = frozenset({"ctx", "context"})


def _where(func: Any) -> str:
    """``name()`` plus the file and line it is defined at, as an error names a function."""
    inner = inspect.unwrap(func)
    while isinstance(inner, functools.partial):
        inner = inner.func
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    code = getattr(inner, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"{name}(){where}"


YES, MAYBE, NO = "yes", "maybe", "no"


def _context_hint(param: inspect.Parameter, namespace: Mapping[str, Any]) -> str:
    """What ``param``'s annotation says about it being the run context: YES (JobContext or
    a subclass, by object or by name), NO (an option's type: str, list[str], Literal...), or
    MAYBE (none, Any, object, a base class or Protocol, or a name that cannot be resolved)."""
    hint = param.annotation
    if hint is inspect.Parameter.empty:
        return MAYBE
    if isinstance(hint, str):
        try:
            hint = eval(hint, dict(namespace))  # as option_hints does
        except Exception:
            # Typically a TYPE_CHECKING-only import of JobContext: judge by the name.
            return YES if param.annotation.rsplit(".", 1)[-1].endswith("JobContext") else MAYBE
    from taskd.run.context import JobContext

    if hint is Any or hint is object:
        return MAYBE
    if typing.is_typeddict(hint):
        return NO  # a table option; TypedDict refuses issubclass, so judge it first
    if isinstance(hint, type):
        # A Protocol the author typed the context as: issubclass refuses most Protocols
        # (not runtime_checkable, or with data members), so it is judged before any.
        if getattr(hint, "_is_protocol", False):
            return MAYBE
        try:
            if issubclass(hint, JobContext):
                return YES
            # A base of JobContext.
            return MAYBE if issubclass(JobContext, hint) else NO
        except TypeError:
            # A class whose metaclass refuses subclass checks: this cannot tell, and a
            # raise here would break every job type of the plugin.
            return MAYBE
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = {
            _context_hint(param.replace(annotation=a), namespace) for a in typing.get_args(hint)
        }
        return YES if YES in found else MAYBE if MAYBE in found else NO
    return NO  # list[str], Literal[...]: an option's type


def _looks_like_context(p: inspect.Parameter, namespace: Mapping[str, Any]) -> bool:
    """A parameter after the first that is surely the context put in the wrong place."""
    hint = _context_hint(p, namespace)
    if hint == YES:
        return True
    return p.name in _CONTEXT_NAMES and hint == MAYBE and p.default is inspect.Parameter.empty


def _param_text(p: inspect.Parameter) -> str:
    """A parameter as it is written in a def (string annotations unquoted)."""
    text = p.name
    if p.annotation is not inspect.Parameter.empty:
        ann = p.annotation
        text += f": {ann if isinstance(ann, str) else _hint_text(ann)}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}"
    elif p.default is not inspect.Parameter.empty:
        text += f"={p.default!r}"
    return text


def context_problem(func: Any) -> str | None:
    """Why ``func`` cannot be an io job's function because of its run context parameter:
    missing (its first parameter is an option), not first, or not positional. The message
    names the function, where it is defined, and the signature to write."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (ValueError, TypeError):
        return "an io job function takes the run context as its first parameter"
    inner = inspect.unwrap(func)
    while isinstance(inner, functools.partial):
        inner = inner.func
    namespace: Mapping[str, Any] = getattr(inner, "__globals__", {})
    where = _where(func)
    name = getattr(inner, "__name__", "job")
    options = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
        and not _looks_like_context(p, namespace)
    ]
    shown = ", ".join(_param_text(p) for p in options[:3])
    fix = f"async def {name}(ctx: taskd.JobContext{', ' + shown if shown else ''}{', ...' if len(options) > 3 else ''})"
    if not params:
        return (
            f"{where} takes no parameters, but an io job function takes the run context as its "
            f"first parameter; write: {fix}"
        )
    for i, p in enumerate(params[1:], start=2):
        if _looks_like_context(p, namespace):
            return (
                f"{where}: the run context {p.name!r} is parameter {i}; an io job function takes "
                f"the run context as its first parameter, the options after it; write: {fix}"
            )
    first = params[0]
    if first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        return (
            f"{where}: an io job function takes the run context as its first (positional) "
            f"parameter, but {first.name!r} is {first.kind.description}; write: {fix}"
        )
    hint = _context_hint(first, namespace)
    if hint == YES or (hint == MAYBE and first.default is inspect.Parameter.empty):
        return None
    if first.name in _CONTEXT_NAMES and hint == MAYBE:
        return None  # `ctx=None`: odd, but the context all the same
    why = (
        f"has a default ({first.default!r}), so it is an option"
        if first.default is not inspect.Parameter.empty
        else f"is annotated {_hint_text(first.annotation)}"
    )
    return (
        f"{where}: an io job function takes the run context as its first parameter, but "
        f"the first parameter {first.name!r} {why}; write: {fix}"
    )
