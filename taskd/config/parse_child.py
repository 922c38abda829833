"""The config parser's own process: TOML bytes on stdin, one pickled answer on stdout.

Run by taskd.config.source as ``python -I -S parse_child.py MAX_BYTES MAX_DEPTH CPU_S MEMORY``
with the config file as stdin. tomllib's cost depends on the file's shape, not only its size
(one 39 KB dotted key: 4 s and 1.5 GB), so the parse runs where the kernel can bound it: this
process sets its own CPU and address-space limits first, and whatever it costs is gone with
it. Only the standard library is used (``-S``: no site-packages, ``-I``: no environment, no
script folder on sys.path), and nothing here imports taskd.

The answer is ``("ok", document)`` or ``("error", kind, detail, line, number)``
(``number`` is the depth found for kind "depth"); taskd.config.source turns the kinds into
messages that name the bound and the fix."""

from __future__ import annotations

import pickle
import resource
import runpy
import sys
import tomllib
from pathlib import Path
from typing import Any

_CHUNK = 64 * 1024


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def _depth_problem(doc: dict[str, Any], max_depth: int) -> tuple[str, int] | None:
    """(key path, depth) of a value nested deeper than ``max_depth`` keys and indexes below
    the document (``jobs.x.options.k`` is 4 deep), else None. Iterative: the document may
    nest far deeper than Python recurses (a dotted key of 20,000 parts nests 20,000 deep)."""
    # Depths only: paths are built (_deep_path) for a document found too deep, not for
    # every value of a valid one (a third of the parse's time for 10,000 jobs).
    # Only tables and arrays are stacked, each with its depth; its values are one deeper.
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(doc, 0)]
    while stack:
        container, depth = stack.pop()
        values = container.values() if isinstance(container, dict) else container
        if depth >= max_depth:
            if values:
                return _deep_path(doc, max_depth)
            continue
        for value in values:
            if isinstance(value, dict | list):
                stack.append((value, depth + 1))
    return None


def _deep_path(doc: dict[str, Any], max_depth: int) -> tuple[str, int]:
    """_depth_problem's answer for a document known to nest deeper than ``max_depth``."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(doc, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > max_depth:
            # How deep that chain goes, following the first child down.
            deepest = len(path)
            while isinstance(value, dict | list) and value:
                value = next(iter(value.values())) if isinstance(value, dict) else value[0]
                deepest += 1
            return _path_text(path), deepest
        if isinstance(value, dict):
            stack.extend((v, (*path, str(k))) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(value))
    raise AssertionError("no value deeper than max_depth")


def _path_text(path: tuple[str | int, ...]) -> str:
    """jobs.x.options.k[0][1], as a config error names a key."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _answer(max_bytes: int, max_depth: int) -> tuple[Any, ...]:
    raw = b""
    while len(raw) <= max_bytes:  # stdin is the regular file the parent opened
        chunk = sys.stdin.buffer.read(_CHUNK)
        if not chunk:
            break
        raw += chunk
    if len(raw) > max_bytes:
        return ("error", "size", f"config file is over {max_bytes} bytes", None, None)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # editors on some systems add a BOM
    except UnicodeDecodeError as exc:
        return ("error", "encoding", f"not UTF-8 text (byte {exc.start})", None, None)
    del raw
    if "\x00" in text:
        return ("error", "nul", "contains NUL bytes", None, None)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return ("error", "toml", str(exc), None, None)
    except RecursionError:
        # tomllib recurses once per nested array or inline table (about 300 of them), long
        # before any other limit: the same bound as below, met early.
        return ("error", "recursion", "", None, None)
    problem = _depth_problem(doc, max_depth)
    if problem is not None:
        # A key path per line, to name the line; linear in the text (taskd.config.lines).
        # Only here: the daemon scans a valid document's text itself if a message needs it.
        key_lines = runpy.run_path(str(Path(__file__).with_name("lines.py")))["key_lines"]
        lines: dict[str, int] = key_lines(text)
        path, depth = problem
        return ("error", "depth", path, _line_of(lines, path.split("[", 1)[0]), depth)
    return ("ok", doc)


def _line_of(lines: dict[str, int], path: str) -> int | None:
    while True:
        if path in lines:
            return lines[path]
        if "." not in path:
            return None
        path = path.rsplit(".", 1)[0]


def main() -> None:
    max_bytes, max_depth, cpu, memory = (int(a) for a in sys.argv[1:5])
    # First of all: nothing below may cost more than this.
    _limit(resource.RLIMIT_CPU, cpu)
    _limit(resource.RLIMIT_AS, memory)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_FSIZE, 0)  # writes no file
    try:
        answer = _answer(max_bytes, max_depth)
    except MemoryError:
        answer = ("error", "memory", "", None, None)
    except RecursionError:
        answer = ("error", "recursion", "", None, None)
    except Exception as exc:  # the parser's own bugs are still a config error, named
        answer = ("error", "parser", f"{type(exc).__name__}: {exc}"[:500], None, None)
    try:
        data = pickle.dumps(answer, protocol=5)
    except (MemoryError, RecursionError):
        data = pickle.dumps(("error", "memory", "", None, None), protocol=5)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
