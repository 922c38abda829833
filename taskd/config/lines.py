"""Where each key of a TOML document sits, so config errors can name a line.

tomllib keeps no positions, so this scans the text: table headers and ``key =`` lines, tracking
the current table. It is a best effort (a key inside a multi-line string could fool it); an
error without a line is still an error with its key path."""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\[\[?\s*(?P<name>[^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"^(?P<key>(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


def _split_dotted(text: str) -> list[str]:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+", text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths ("jobs.backup.every", "jobs.backup") to 1-based line numbers."""
    lines: dict[str, int] = {}
    table: list[str] = []
    in_multiline: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if in_multiline:
            if raw.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        if not line or line.startswith("#"):
            continue
        header = _HEADER.match(line)
        if header:
            table = _split_dotted(header.group("name"))
            lines.setdefault(".".join(table), number)
            continue
        key = _KEY.match(line)
        if key:
            path = [*table, *_split_dotted(key.group("key"))]
            for i in range(len(table) + 1, len(path) + 1):
                lines.setdefault(".".join(path[:i]), number)
            rest = line[key.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
    return lines
