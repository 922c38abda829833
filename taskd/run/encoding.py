"""A run's result in the form the daemon keeps it, measured within bounds. (Standard library
only: the pool's workers import it.)

A result is kept as JSON text (the history row, the job's last result): ``max_result_size``
counts the UTF-8 bytes of that text as written, ``json.dumps(result, ensure_ascii=False)``
(or of the JSON string holding its ``repr()`` when the result is not JSON), for every kind of
job. The text is never built when it would be over the limit: pickle stores a shared object
once, while JSON and ``repr()`` repeat it, so a 5 KB pickle (``[[s] * 1000] * 1000``) can
stand for a gigabyte of text. :func:`encode` tells the common small result at once; plain
data (builtin types only) by a pickle made without a memo, which repeats shared objects as
JSON does and bounds the text's size both ways, at C speed; anything else by a walk that
adds up the least the text can take, counting each distinct object once, and stops as soon
as that passes the limit (every element adds at least a byte, so the walk does O(limit)
work whatever the result's shape). Only a result known to fit is encoded, by the C
encoder, and then measured exactly."""

from __future__ import annotations

import json
import pickle
from typing import Any, NamedTuple

__all__ = [
    "NO_RESULT",
    "SCALARS",
    "Encoded",
    "TooLarge",
    "encode",
    "size_text",
    "text_floor",
    "too_large",
    "transport_bound",
]


def size_text(n: int) -> str:
    """``n`` bytes for a message: "50 bytes", "1048576 bytes (1 MiB)", "2000000 bytes (2 MB)";
    never a rounded "0.0 MiB"."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n} bytes ({n // unit} {name})"
    for unit, name in ((10**9, "GB"), (10**6, "MB"), (10**3, "KB")):
        if n >= unit and n % unit == 0:
            return f"{n} bytes ({n // unit} {name})"
    return f"{n} bytes"


def transport_bound(limit: int) -> int:
    """The most a cpu run's pickled result may take on the pipe, for ``max_result_size``
    ``limit``: a guard against a result whose pickle is far bigger than its JSON (an object
    with a short repr and a big state), set well above the JSON limit so that pickle's own
    overhead (9 bytes a float against JSON's 5) never fails a result under the limit."""
    return 2 * limit + 65_536


class Encoded(NamedTuple):
    """A result in the form the daemon keeps it."""

    stored: Any  # the result itself, or its repr when it is not JSON
    text: str | None  # ``stored`` as JSON text; None for no result
    serialisable: bool  # the result itself was JSON (not a repr)
    size: int  # UTF-8 bytes of ``text``


NO_RESULT = Encoded(None, None, True, 0)


class TooLarge(Exception):
    """The result's JSON text would be over the limit; it was not built."""

    def __init__(self, size: int, exact: bool) -> None:
        super().__init__(size, exact)
        self.size = size  # bytes: the text's size if ``exact``, else a floor already over
        self.exact = exact


class _NotJSON(Exception):
    pass


SCALARS = frozenset({int, float, bool, type(None)})


def encode(result: Any, limit: int) -> Encoded:
    """``result`` as the daemon stores it, if its text takes at most ``limit`` bytes of UTF-8;
    raises :class:`TooLarge` if not, having built no more than a few times ``limit`` bytes of
    text. A result that is not JSON is stored as its ``repr()`` (a class's own ``__repr__``
    is the job's code and runs as such)."""
    if result is None:
        return NO_RESULT
    kind = type(result)
    plain: int | None
    if kind in SCALARS or (kind is str and len(result) * 6 + 2 <= limit) or _flat(result, limit):
        plain = 0
    else:
        plain = _plain_size(result, limit)
    if plain == _OVER:
        raise TooLarge(limit + 1, False)
    if plain is not None and plain <= limit + _SLACK:
        # Plain data whose text is at most 9 times its pickle: the C encoder may build it.
        try:
            return _measured(result, _to_json(result), True, limit)
        except (TypeError, ValueError):
            pass  # not JSON (a set, bytes): stored as its repr, below
    else:
        try:
            if text_floor(result, limit, json_mode=True) <= limit:
                return _measured(result, _to_json(result), True, limit)
        except (_NotJSON, TypeError, ValueError):
            pass  # stored as its repr, below
    text_floor(result, limit, json_mode=False)  # raises TooLarge past the limit
    shown = repr(result)
    if len(shown) > limit:  # its JSON string is longer still
        raise TooLarge(len(shown) + 2, False)
    return _measured(shown, _to_json(shown), False, limit)


# What json.dumps(ensure_ascii=False) makes, without building an encoder on every call.
_to_json = json.JSONEncoder(ensure_ascii=False).encode
_FLAT_MAX = 16  # items
_INT_CAP = 1 << 63


def _flat(result: Any, limit: int) -> bool:
    """Whether ``result`` is a short list, tuple or dict of scalars and strings whose JSON
    text is surely within ``limit`` bytes: the commonest result, told in a few steps."""
    kind = type(result)
    if kind is dict:
        if len(result) > _FLAT_MAX:
            return False
        items: Any = (*result, *result.values())
    elif kind is list or kind is tuple:
        if len(result) > _FLAT_MAX:
            return False
        items = result
    else:
        return False
    chars = 0
    for item in items:
        kind = type(item)
        if kind is str:
            chars += len(item)
        elif kind not in SCALARS or (kind is int and not -_INT_CAP < item < _INT_CAP):
            return False
    # 6 bytes a character at most (a control character); 32 an item for the rest: a float
    # or a short int (24 characters at most), the quotes of a key, the separators.
    return chars * 6 + 2 * _FLAT_MAX * 32 <= limit


# The pickle of plain data made without a memo (so a shared object is written each time it
# appears, as JSON and repr repeat it) bounds its text both ways: the text takes at most 9
# bytes per byte of pickle (a dict key False: one byte, '"false": ' in JSON; a control
# character takes 6) and at least a third (a lone float: 9 bytes, "0.0"; strings take about
# as much in both). Pickling is C code, about twice as fast as json.dumps.
_TEXT_PER_PICKLE_BYTE = 3
_SLACK = 65_536  # bytes of pickle framing and opcodes a result's pickle may add
_OVER = -1


class _Plain(pickle.Pickler):
    """Pickles plain data only (exact ints, floats, strings, bytes, lists, tuples, dicts and
    sets: reducer_override is never called for those) into a byte count that stops at its
    cap."""

    def reducer_override(self, obj: Any) -> Any:
        raise _NotPlain  # a class of the job's: its reduction is its code, maybe costly


class _NotPlain(Exception):
    pass


class _Over(Exception):
    pass


class _Count:
    __slots__ = ("cap", "n")

    def __init__(self, cap: int) -> None:
        self.n = 0
        self.cap = cap

    def write(self, data: bytes) -> int:
        self.n += len(data)
        if self.n > self.cap:
            raise _Over
        return len(data)


def _plain_size(result: Any, limit: int) -> int | None:
    """The memo-less pickle size of ``result`` if it is plain data; _OVER once that passes
    3 x ``limit`` (so its text is surely over ``limit``); None for anything else (a class of
    the job's, a cycle, too deep to pickle): the exact walk decides those."""
    out = _Count(_TEXT_PER_PICKLE_BYTE * limit + _SLACK)
    pickler = _Plain(out, pickle.HIGHEST_PROTOCOL)
    pickler.fast = True  # no memo
    try:
        pickler.dump(result)
    except _Over:
        return _OVER
    except Exception:
        return None
    return out.n


def _measured(stored: Any, text: str, serialisable: bool, limit: int) -> Encoded:
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            # A lone surrogate cannot be stored as UTF-8: it is kept \u-escaped, as JSON
            # allows, and that text is what counts.
            text = json.dumps(stored)
            size = len(text)
    if size > limit:
        raise TooLarge(size, True)
    return Encoded(stored, text, serialisable, size)


def too_large(what: str, size: int, exact: bool, limit: int) -> str:
    """The message for a result over ``max_result_size``."""
    how = f"{size} bytes" if exact else f"more than {limit} bytes"
    return (
        f"the result ({what}) is {how} as JSON (UTF-8, as stored), over max_result_size="
        f"{size_text(limit)}; return less (write big output to a file and return its path) "
        f"or raise [daemon] max_result_size"
    )


def _int_floor(n: int) -> int:
    # Decimal digits (and sign) of n without converting it: bit_length * log10(2), rounded
    # down, is at most the digit count.
    bits = n.bit_length()
    return max(1, (bits * 30103) // 100000) + (n < 0)


def text_floor(obj: Any, limit: int, *, json_mode: bool, call_repr: bool = True) -> int:
    """The least number of bytes (UTF-8) that ``obj``'s JSON text (``json_mode``) or repr can
    take, counting each distinct object's walk once. Raises TooLarge as soon as it passes
    ``limit``, and _NotJSON (``json_mode``) at the first thing JSON cannot hold. Without
    ``call_repr``, objects of other classes count their attributes' floor instead of calling
    their ``__repr__`` (for error messages, whose rendering must stay bounded)."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(o: Any) -> int:
        t = type(o)
        if t is str:
            return len(o) + 2
        if t is int:
            return _int_floor(o)
        if t is float or t is bool or o is None:
            return 3
        if t is list or t is tuple or t is dict:
            return container(o)
        if isinstance(o, str):
            return len(o) + 2
        if isinstance(o, int):
            return _int_floor(int(o))
        if isinstance(o, float):
            return 3
        if isinstance(o, list | tuple | dict):
            return container(o)
        if json_mode:
            raise _NotJSON
        if isinstance(o, bytes | bytearray):
            return len(o) + 3
        if isinstance(o, set | frozenset) or (
            hasattr(t, "__dataclass_fields__") and not isinstance(o, type)
        ):
            return container(o)
        if call_repr:
            key = id(o)
            got = memo.get(key)
            if got is None:
                got = memo[key] = len(repr(o))
            return got
        state = getattr(o, "__dict__", None)
        return container(state) if type(state) is dict else 1

    def container(o: Any) -> int:
        key = id(o)
        got = memo.get(key)
        if got is not None:
            return got
        if key in active:
            if json_mode:
                raise _NotJSON  # a cycle: json.dumps refuses it
            return 5  # repr shows "[...]"
        active.add(key)
        n = 2
        if isinstance(o, dict):
            for k, v in o.items():
                if json_mode and not (type(k) is str or isinstance(k, str | int | float | None)):
                    raise _NotJSON  # json.dumps refuses such a key
                n += size(k) + size(v) + 4
                if n > limit:
                    raise TooLarge(n, False)
        elif isinstance(o, list | tuple | set | frozenset):
            for v in o:
                n += size(v) + 2
                if n > limit:
                    raise TooLarge(n, False)
        else:  # a dataclass: its own repr shows each field that has repr=True
            from dataclasses import fields

            for f in fields(o):
                if f.repr:
                    n += len(f.name) + 3 + size(getattr(o, f.name))
                    if n > limit:
                        raise TooLarge(n, False)
        if n > 2:
            n -= 2  # no separator after the last item
        active.discard(key)
        memo[key] = n
        return n

    total = size(obj)
    if total > limit:
        raise TooLarge(total, False)
    return total
