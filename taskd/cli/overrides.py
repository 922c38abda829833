"""``-o key=value``: one option of a job set from the command line (``taskd exec``).

The value is read as a TOML value, so it has the type it would have in the config file:
``-o retries=3`` is an integer, ``-o urls=["a","b"]`` an array, ``-o loud=true`` a boolean.
A value that is not TOML is taken as a string (``-o path=/tmp/x``), unless it starts like a
TOML string, array or table, where a typo must not pass for a string. The key is a TOML key:
``-o headers.Accept=json`` sets one entry of the ``headers`` table. The result is checked
against the job's function like the config (taskd.plugin.options)."""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# An -o is typed by hand; these bound what a runaway script could pass. TOML parsers are slow
# on some shapes (a dotted key of thousands of parts), so the key is kept short.
MAX_OVERRIDE_CHARS = 16 * 1024
MAX_KEY_CHARS = 256
MAX_KEY_PARTS = 8
# The config's own bound (taskd.config.source.MAX_DEPTH) less the jobs.NAME.options.KEY above.
MAX_VALUE_DEPTH = 28
_TOML_OPENERS = ('"', "'", "[", "{")


class OverrideError(ValueError):
    """An ``-o`` that cannot be used; the message names it and says what to write."""


@dataclass(frozen=True, slots=True)
class Override:
    text: str  # as given, for messages
    keys: tuple[str, ...]  # the dotted key's parts
    value: Any


def parse_override(text: str) -> Override:
    """One ``key=value``; raises OverrideError saying what is wrong and what to write."""
    label = f"-o {_short(text)}"
    if len(text) > MAX_OVERRIDE_CHARS:
        raise OverrideError(
            f"{label}: longer than {MAX_OVERRIDE_CHARS} characters; put big values in the "
            f"config file"
        )
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise OverrideError(f"{label}: expected key=value, e.g. -o retries=3")
    if not key:
        raise OverrideError(f"{label}: no key before '='; expected key=value")
    if len(key) > MAX_KEY_CHARS:
        raise OverrideError(f"{label}: the key is longer than {MAX_KEY_CHARS} characters")
    keys = _keys(key, label)
    return Override(text, keys, _value(raw.strip(), label))


def _keys(key: str, label: str) -> tuple[str, ...]:
    try:
        doc: Any = tomllib.loads(f"{key} = 0")
    except (tomllib.TOMLDecodeError, RecursionError):
        raise OverrideError(
            f"{label}: {key!r} is not a TOML key; quote odd characters: -o '\"{key}\"=...'"
        ) from None
    parts: list[str] = []
    while isinstance(doc, dict) and len(doc) == 1:
        ((name, doc),) = doc.items()
        parts.append(name)
    if len(parts) > MAX_KEY_PARTS or doc != 0:
        raise OverrideError(f"{label}: {key!r} is not one key (at most {MAX_KEY_PARTS} parts)")
    return tuple(parts)


def _value(raw: str, label: str) -> Any:
    try:
        doc = tomllib.loads(f"v = {raw}")
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        if raw.startswith(_TOML_OPENERS) or raw in ("", "True", "False"):
            why = re.sub(r" \(at (line|end).*\)$", "", str(exc))  # positions in our wrapper
            raise OverrideError(
                f"{label}: {_short(raw)!r} is not a valid TOML value ({why}); write strings "
                f'in quotes, arrays as ["a", "b"], booleans as true or false'
            ) from None
        return raw  # a bare word: the string it reads as
    if set(doc) != {"v"}:
        raise OverrideError(f"{label}: {_short(raw)!r} is more than one TOML value")
    if _depth(doc["v"]) > MAX_VALUE_DEPTH:
        raise OverrideError(
            f"{label}: the value nests more than {MAX_VALUE_DEPTH} arrays or tables deep, "
            f"like the config's limit; flatten it"
        )
    return doc["v"]


def _depth(value: Any) -> int:
    """How deep arrays and tables nest in ``value``, without recursion (it may be deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_VALUE_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def apply_overrides(options: Mapping[str, Any], overrides: list[Override]) -> dict[str, Any]:
    """A copy of ``options`` with each override set, in order (the last one wins)."""
    merged: dict[str, Any] = copy.deepcopy(dict(options))
    for o in overrides:
        table = merged
        for part in o.keys[:-1]:
            inner = table.get(part)
            if not isinstance(inner, dict):
                inner = table[part] = {}  # replaces a non-table: the check below names it
            table = inner
        table[o.keys[-1]] = o.value
    return merged


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
