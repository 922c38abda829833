"""Reading a config file: the bytes off disk and the TOML parse, each failure a ConfigError
naming the file. What the parsed document means is taskd.config.load's business."""

from __future__ import annotations

import re
import stat
import tomllib
from pathlib import Path
from typing import Any

from taskd.errors import ConfigError, ConfigIssue

MAX_CONFIG_BYTES = 4 * 1024 * 1024


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse a TOML file; every failure (missing, huge, binary, not TOML, parser crash) becomes
    a ConfigError naming the file, never a traceback."""
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            raise _single(
                path, "is not a regular file (a device, FIFO or socket); a config file is TOML text"
            )
        size = st.st_size
        if size > MAX_CONFIG_BYTES:
            raise _single(
                path,
                f"config file is {size} bytes; the limit is {MAX_CONFIG_BYTES} (is this the right file?)",
            )
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # the file may grow between stat and read
        if len(raw) > MAX_CONFIG_BYTES:
            raise _single(
                path, f"config file is over {MAX_CONFIG_BYTES} bytes (is this the right file?)"
            )
    except FileNotFoundError:
        raise _single(
            path, "config file not found; pass --config FILE or set TASKD_CONFIG"
        ) from None
    except IsADirectoryError:
        raise _single(path, "is a directory, not a config file") from None
    except OSError as exc:
        raise _single(path, f"cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # editors on some systems add a BOM
    except UnicodeDecodeError as exc:
        raise _single(
            path, f"not UTF-8 text (byte {exc.start}); a config file is TOML text"
        ) from None
    if "\x00" in text:
        raise _single(path, "contains NUL bytes; a config file is TOML text")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = int(match.group(1)) if match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        col = f" column {match.group(2)}" if match else ""
        raise ConfigError(
            [ConfigIssue(str(path), "", f"not valid TOML: {message}{col and ' at' + col}", line)]
        ) from None
    except (
        RecursionError,
        MemoryError,
        Exception,
    ) as exc:  # the parser's own bugs are still config errors
        raise _single(
            path, f"the TOML parser failed on this file ({type(exc).__name__}: {exc}); is it TOML?"
        ) from None
    return data, text


def _single(path: Path, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(str(path), "", message)])
