"""What every ``taskd`` subcommand shares: exit codes, the config path, error printing."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from taskd.config import DEFAULT_CONFIG, suggest
from taskd.errors import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_NO_DAEMON = 3  # as systemctl uses 3 for "not running"
EX_CONFIG = 78  # sysexits.h


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("TASKD_CONFIG") or DEFAULT_CONFIG)


def print_config_error(exc: ConfigError) -> None:
    print(
        f"taskd: config has {len(exc.issues)} error{'s' if len(exc.issues) != 1 else ''}:",
        file=sys.stderr,
    )
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)


def no_such_job(name: str, known: Iterable[str], path: Path) -> int:
    hint = suggest(name, known)
    print(f"taskd: no job {name!r} in {path}" + (f"; {hint}" if hint else ""), file=sys.stderr)
    return EXIT_FAIL


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def emit(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))
