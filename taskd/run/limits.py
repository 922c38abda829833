"""Bounds on what a run hands back to the daemon: its error text, and the sizes both sides
name in messages. (Standard library only: the pool's workers import it.)

Error text is made within bounds: an exception whose arguments are big (a list of a million
rows, or one row a million times, which pickle sends in a few KB) is rendered abridged by
:func:`describe`, never through an unbounded ``str()``; a cpu job's worker and a blocking
job's thread make that text where the exception was raised (:func:`remember`), so the
daemon's loop never renders it again. A result's size: see :mod:`taskd.run.encoding`."""

from __future__ import annotations

import contextlib
import reprlib
from typing import Any

from taskd.run.encoding import SCALARS, TooLarge, text_floor

__all__ = [
    "MAX_ERROR_TEXT",
    "MAX_REMOTE_TEXT",
    "cut",
    "describe",
    "has_big_args",
    "is_big",
    "recall",
    "remember",
]

# that raises with a 5 MB message must not write 5 MB lines and rows on every run.
MAX_ERROR_TEXT = 4096
# Each text of a cpu run's error reply (its message, its traceback) is cut to this in the
# worker, so a huge one never crosses the pipe; the traceback goes into the exception's notes.
MAX_REMOTE_TEXT = 16_384
# An exception whose arguments (or attributes) take at least this much text is rendered
# abridged: its own str() would build all of it first.
_BIG_ARGS = 4 * MAX_ERROR_TEXT


def cut(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text``, or its first ``limit`` characters and a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


def is_big(value: Any, floor: int = _BIG_ARGS) -> bool:
    """Whether ``value``'s repr takes more than ``floor`` characters, found without building
    it or calling any class's own ``__repr__``."""
    try:
        text_floor(value, floor, json_mode=False, call_repr=False)
    except TooLarge:
        return True
    except Exception:  # an odd object: its rendering is judged (and cut) instead
        return False
    return False


def has_big_args(exc: BaseException) -> bool:
    """Whether ``exc``'s arguments or public attributes would make a long text: then its own
    ``str()`` (which shows them, usually) must not be called."""
    if is_big(exc.args):
        return True
    attrs = getattr(exc, "__dict__", None) or {}
    state = {k: v for k, v in attrs.items() if not k.startswith("_")}
    return bool(state) and is_big(state)


class _Abridged(reprlib.Repr):
    """reprlib with limits that keep the whole rendering within a few KB, and no call to an
    object's own ``__repr__`` (which could build any amount of text)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 8
        self.maxset = self.maxfrozenset = self.maxdeque = 8
        self.maxstring = self.maxlong = self.maxother = 80

    def repr_instance(self, x: Any, level: int) -> str:
        if type(x) in SCALARS:
            return reprlib.Repr.repr_instance(self, x, level)
        if isinstance(x, bytes | bytearray):
            return reprlib.Repr.repr_instance(self, x[: self.maxother], level)
        return f"<{type(x).__qualname__} object>"


_abridged = _Abridged()


_TEXT = "_taskd_error_text"


def remember(exc: BaseException, text: str) -> None:
    """Keep ``exc``'s text, made (within bounds) where it was raised: in a cpu job's worker, a
    blocking job's thread. The daemon then records that text (:func:`recall`) rather than
    render the exception again on its loop."""
    with contextlib.suppress(Exception):  # an exception without a __dict__: described again
        vars(exc)[_TEXT] = text


def recall(exc: BaseException) -> str | None:
    """The text :func:`remember` kept for ``exc``, if any."""
    text = (getattr(exc, "__dict__", None) or {}).get(_TEXT)
    return text if type(text) is str else None


def describe(exc: BaseException, limit: int = MAX_ERROR_TEXT) -> str:
    """``Type: message`` of ``exc``, at most ``limit`` characters and a cut marker, built
    within bounds: an exception whose arguments or attributes are big (a list of a million
    rows, or one row repeated a million times) is rendered abridged, with reprlib's limits,
    since its own ``str()`` would build the whole text first."""
    name = type(exc).__qualname__
    try:
        message = _message(exc)
    except BaseException:  # a broken __str__: the run still failed, and says so
        message = "<str() of the exception failed>"
    return cut(f"{name}: {message}" if message else name, limit)


def _message(exc: BaseException) -> str:
    args = exc.args
    if len(args) == 1 and type(args[0]) is str and type(exc).__str__ is BaseException.__str__:
        return args[0]  # str(exc) would be this very string: cut() only slices it
    if not has_big_args(exc):
        return str(exc)
    shown = _abridged.repr(args[0] if len(args) == 1 else args)
    return f"{shown} [abridged: its full text is over {_BIG_ARGS} characters]"
