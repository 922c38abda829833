"""Where each key of a TOML document sits, so config errors can name a line.

tomllib keeps no positions, so this scans the text: table headers and ``key =`` lines, tracking
the current table. It is a best effort (a key inside a multi-line string could fool it); an
error without a line is still an error with its key path.

Whatever the text, the scan is linear in its length: the patterns cannot backtrack more than
once over a line (a header's name is matched greedily by a class that excludes its closing
bracket), and only the first ``depth`` parts of a key path are recorded, so a dotted key of
thousands of parts costs ``depth`` entries, not a square of its length. So it may run in the
daemon: a config's KeyLines scans its text there, and only when a message needs a line (a
valid config never does); the parser's process (taskd.config.parse_child) runs it for a
document nested too deep.

Standard library only: the parser's process runs this file without taskd on its path."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

# Not `\s*(?P<name>[^\[\]]+?)\s*\]`: a lazy name followed by optional spaces retries every
# split of a long run of spaces, quadratic in a line's length (5 minutes for a 1 MiB line).
_HEADER = re.compile(r"^\[\[?(?P<name>[^\[\]]*)\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"^(?P<key>(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


_PART = re.compile(r"\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+")
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _split_dotted(text: str) -> list[str]:
    if _BARE.fullmatch(text):  # most keys: one bare part, no scan needed
        return [text]
    parts = _PART.findall(text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


DEPTH = 8


def key_lines(text: str, depth: int = DEPTH) -> dict[str, int]:
    """Map dotted key paths ("jobs.backup.every", "jobs.backup") to 1-based line numbers;
    paths of more than ``depth`` parts are left out (their parents are in)."""
    lines: dict[str, int] = {}
    table: list[str] = []
    prefix = ""
    in_multiline: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if in_multiline:
            if raw.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        if not line or line.startswith("#"):
            continue
        header = _HEADER.match(line) if line[0] == "[" else None
        if header:
            table = _split_dotted(header.group("name").strip())[:depth]
            if table:
                lines.setdefault(".".join(table), number)
            # What a bare key below it adds to make its path, while the table leaves room.
            prefix = ".".join(table) + "." if 0 < len(table) < depth else ""
            continue
        key = _KEY.match(line)
        if key:
            name = key.group("key")
            if prefix and _BARE.fullmatch(name):  # `key = ...` in a table: one path
                lines.setdefault(prefix + name, number)
            else:
                path = [*table, *_split_dotted(name)][:depth]
                for i in range(len(table) + 1, len(path) + 1):
                    lines.setdefault(".".join(path[:i]), number)
            rest = line[key.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
    return lines


class KeyLines(Mapping[str, int]):
    """key_lines() of a config's text (UTF-8 bytes), worked out on first use. Only a config
    with a problem to name needs it: for 10,000 jobs the scan was a fifth of the parser's
    time, and the parse is the longest step to READY."""

    __slots__ = ("_lines", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._lines: dict[str, int] | None = None

    def _map(self) -> dict[str, int]:
        if self._lines is None:
            text = self._raw.decode("utf-8", "replace").removeprefix("\ufeff")
            self._lines = key_lines(text)
            self._raw = b""
        return self._lines

    def __getitem__(self, path: str) -> int:
        return self._map()[path]

    def __contains__(self, path: object) -> bool:
        return path in self._map()

    def __iter__(self) -> Iterator[str]:
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())
