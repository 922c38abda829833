"""Check a job's ``options`` table against its function's parameters and annotations.

Each value is checked and converted by :mod:`taskd.plugin.values`; this module matches the
table's keys to the function's parameters, once per job type (:class:`OptionSpec`)."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskd.plugin.ctxparam import context_problem
from taskd.plugin.jobtype import JobType
from taskd.plugin.values import _convert, _hint_text, check_value

__all__ = [
    "OptionSpec",
    "check_options",
    "check_value",
    "convert_options",
    "describe_options",
    "option_hints",
    "signature_problem",
]


def option_hints(jt: JobType) -> dict[str, Any]:
    """Each option parameter's annotation, resolved one by one.

    Not typing.get_type_hints: one name it cannot resolve (a type imported only under
    TYPE_CHECKING, typically the context's) would cost the type checks of every option.
    Raises TypeError naming the option whose annotation cannot be resolved."""
    return _resolve_hints(jt, _params(jt))


def _resolve_hints(jt: JobType, params: Sequence[inspect.Parameter]) -> dict[str, Any]:
    func: Any = inspect.unwrap(jt.func)
    while isinstance(func, functools.partial):
        func = func.func
    func = getattr(func, "__func__", func)  # a bound method
    namespace = getattr(func, "__globals__", None)
    if namespace is None:  # a callable object: its class's module
        module = sys.modules.get(getattr(func, "__module__", "") or type(func).__module__)
        namespace = vars(module) if module is not None else {}
    namespace = dict(namespace)
    hints: dict[str, Any] = {}
    for param in params:
        annotation = param.annotation
        if annotation is inspect.Parameter.empty:
            continue
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # what get_type_hints does, per name
            except Exception as exc:
                raise TypeError(
                    f"the annotation {param.annotation!r} of option {param.name!r} cannot be "
                    f"resolved ({type(exc).__name__}: {exc}); import the names it uses at module "
                    f"level, not only under TYPE_CHECKING"
                ) from None
        hints[param.name] = annotation
    return hints


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """What checking and converting options needs from a job type's function: its
    parameters and their resolved annotations, worked out once per job type. A config
    names the same few job types for thousands of jobs, and ``inspect.signature`` with the
    annotations' eval costs about 15 µs each time (three times per job before this)."""

    params: tuple[inspect.Parameter, ...]
    hints: Mapping[str, Any]
    hint_error: str | None  # why the annotations cannot be resolved; then nothing is checked
    by_name: Mapping[str, inspect.Parameter]  # the options, by keyword
    takes_any: bool  # a **kwargs parameter: unknown options go through

    @classmethod
    def of(cls, jt: JobType) -> OptionSpec:
        params = tuple(_params(jt))
        hints: dict[str, Any] = {}
        error = None
        try:
            hints = _resolve_hints(jt, params)
        except TypeError as exc:
            error = str(exc)
        return cls(
            params,
            hints,
            error,
            {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
            any(p.kind is p.VAR_KEYWORD for p in params),
        )


def convert_options(
    jt: JobType, options: Mapping[str, Any], spec: OptionSpec | None = None
) -> dict[str, Any]:
    """The keyword arguments for the call: checked options converted to what the annotations
    promise (a ``Path`` parameter gets a Path, not the TOML string). ``spec``: the job
    type's OptionSpec when the caller has it (resolving many jobs of one type)."""
    if spec is None:
        hints = option_hints(jt)
    elif spec.hint_error is not None:
        raise TypeError(spec.hint_error)
    else:
        hints = dict(spec.hints)
    return {k: _convert(v, hints[k]) if k in hints else v for k, v in options.items()}


def signature_problem(jt: JobType) -> str | None:
    """Why this job type's function cannot be called with options, if it cannot."""
    params = _params(jt)
    for p in params:
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty:
            return f"parameter {p.name!r} is positional-only; options are passed by keyword"
    try:
        _resolve_hints(jt, params)
    except TypeError as exc:
        return str(exc)
    if jt.kind == "io":
        return context_problem(jt.func)
    return None


def _params(jt: JobType) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(jt.func).parameters.values())
    except (ValueError, TypeError):
        return []
    return params[1:] if jt.kind == "io" and params else params


def check_options(
    jt: JobType, options: Mapping[str, Any], spec: OptionSpec | None = None
) -> list[tuple[str, str, str | None]]:
    """Problems as (option name or "", message, hint); empty when the options fit.
    ``spec``: the job type's OptionSpec when the caller has it."""
    from taskd.config.checks import suggest

    if spec is None:
        spec = OptionSpec.of(jt)
    if spec.hint_error is not None:
        return [("", spec.hint_error, None)]
    problems: list[tuple[str, str, str | None]] = []
    hints, by_name = spec.hints, spec.by_name
    for key, value in options.items():
        param = by_name.get(key)
        if param is None:
            if not spec.takes_any:
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
        hints = option_hints(jt)
    except TypeError:
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
