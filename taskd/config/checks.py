"""What the config validators share: the issue collector that keeps every problem with its
line, the value converters, and "did you mean" suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from taskd.errors import ConfigIssue

T = TypeVar("T")


def suggest(word: str, choices: Any) -> str | None:
    """ "did you mean 'x'?" for the closest choice, or None when nothing is close."""
    options = list(choices)
    by_lower = {c.lower(): c for c in options}
    if word.lower() in by_lower:  # "INFO", "utc": only the case is off
        return f"did you mean {by_lower[word.lower()]!r}?"
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"did you mean {by_lower[close[0]]!r}?" if close else None


def check_timezone(name: str) -> str | None:
    """None if ``name`` is a known IANA zone, else a message with a suggestion."""
    try:
        ZoneInfo(name)
        return None
    except (ZoneInfoNotFoundError, ValueError):
        import zoneinfo

        hint = suggest(name, zoneinfo.available_timezones())
        return f"unknown time zone {name!r}" + (
            f"; {hint}" if hint else '; use an IANA name such as "Europe/Berlin"'
        )


class _Collector:
    """Gathers issues with file and line so one pass reports everything."""

    def __init__(self, file: Path, lines: Mapping[str, int]) -> None:
        self.file = str(file)
        self.lines = lines
        self.issues: list[ConfigIssue] = []

    def add(self, path: str, message: str, hint: str | None = None) -> None:
        line = self.lines.get(path)
        probe = path
        while line is None and "." in probe:
            probe = probe.rsplit(".", 1)[0]
            line = self.lines.get(probe)
        self.issues.append(ConfigIssue(self.file, path, message, line, hint))

    def unknown_keys(self, table: Mapping[str, Any], prefix: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.add(
                    f"{prefix}.{key}",
                    f"unknown key {key!r} in [{prefix}]",
                    suggest(key, known) or f"known keys: {', '.join(known)}",
                )

    def take(
        self, table: Mapping[str, Any], key: str, prefix: str, conv: Callable[[Any], T], default: T
    ) -> T:
        if key not in table:
            return default
        try:
            return conv(table[key])
        except (ValueError, TypeError) as exc:
            self.add(f"{prefix}.{key}", str(exc))
            return default


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type_name(value)}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type_name(value)}")
    return value


def _int_range(low: int, high: int | None = None) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected a whole number, got {type_name(value)}")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"from {low} to {high}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return conv


def _choice(choices: tuple[str, ...]) -> Callable[[Any], Any]:
    def conv(value: Any) -> Any:
        text = _string(value)
        if text not in choices:
            hint = suggest(text, choices)
            raise ValueError(
                f"must be one of {', '.join(choices)}, got {text!r}" + (f"; {hint}" if hint else "")
            )
        return text

    return conv


def type_name(value: Any) -> str:
    """How a config error names a TOML value's type: "a string", "an array", ..."""
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)
