"""What every ``taskd`` subcommand shares: exit codes, the config path and the daemon's
directories, error printing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskd.config import Config, DaemonConfig, load_config, read_toml, suggest
from taskd.config.source import config_file
from taskd.errors import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_NO_DAEMON = 3  # as systemctl uses 3 for "not running"
EX_CONFIG = 78  # sysexits.h


def config_path(args: argparse.Namespace) -> Path:
    return config_file(args.config)


@dataclass(frozen=True, slots=True)
class DaemonDirs:
    """Where the daemon of a config keeps its state and its control socket, and how that was
    found (for messages: an operator must be able to tell which file or default was used)."""

    state_dir: Path
    runtime_dir: Path
    config_path: Path  # absolute: the file -c / TASKD_CONFIG / the default names
    config: Config | None  # the validated config; None when it is missing or invalid
    config_error: ConfigError | None  # why ``config`` is None
    origin: str  # where state_dir came from, e.g. "/etc/taskd/taskd.toml" or "--state-dir"


def locate_daemon_dirs(args: argparse.Namespace) -> DaemonDirs:
    """The state_dir and runtime_dir of the config the command names, even when that config
    is invalid or missing: ``taskd history`` and ``taskd reload`` are run exactly when
    something is wrong, and a typo elsewhere in the file must not hide where the daemon is.

    In order: ``--state-dir`` / ``--runtime-dir`` when the command has them and they are
    given; the validated config; else the file's ``[daemon]`` table read as plain TOML,
    taking ``state_dir`` / ``runtime_dir`` when they are non-empty strings (a relative path
    is relative to the config's folder, as the loader does); else DaemonConfig's defaults.
    Never raises for a config problem; ``config_error`` says what it was."""
    path = Path(config_path(args)).expanduser().absolute()
    defaults = DaemonConfig()
    config: Config | None = None
    error: ConfigError | None = None
    state_dir: Path | None = None
    runtime_dir: Path | None = None
    try:
        config = load_config(path)
        state_dir, runtime_dir = config.daemon.state_dir, config.daemon.runtime_dir
        origin = str(path)
    except ConfigError as exc:
        error = exc
        state_dir, runtime_dir = _raw_dirs(path)
        if state_dir is not None:
            origin = f"{path}, read as written since the file is invalid"
        elif path_exists(path):
            origin = f"the default, since {path} is invalid and its state_dir unreadable"
        else:
            origin = f"the default, since {path} does not exist"
    explicit_state = getattr(args, "state_dir", None)
    explicit_runtime = getattr(args, "runtime_dir", None)
    if explicit_state:
        state_dir, origin = Path(explicit_state).expanduser().absolute(), "--state-dir"
    if explicit_runtime:
        runtime_dir = Path(explicit_runtime).expanduser().absolute()
    return DaemonDirs(
        state_dir=state_dir or defaults.state_dir,
        runtime_dir=runtime_dir or defaults.runtime_dir,
        config_path=path,
        config=config,
        config_error=error,
        origin=origin,
    )


def path_exists(path: Path) -> bool:
    """Path.exists(), except that a path the system cannot even look up (a name too long,
    from --config or TASKD_CONFIG) is "not there" rather than a traceback."""
    try:
        return path.exists()
    except OSError:
        return False


def daemon_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(state_dir, runtime_dir)`` for the config the command names; see
    :func:`locate_daemon_dirs`, which also says where they came from."""
    dirs = locate_daemon_dirs(args)
    return dirs.state_dir, dirs.runtime_dir


def _raw_dirs(path: Path) -> tuple[Path | None, Path | None]:
    """state_dir and runtime_dir from an invalid config's ``[daemon]`` table, each None
    when the file is unreadable or not TOML or the value is not a usable path string."""
    try:
        data, _ = read_toml(path)
    except ConfigError:
        return None, None
    table = data.get("daemon")
    if not isinstance(table, dict):
        return None, None
    return _raw_path(table.get("state_dir"), path.parent), _raw_path(
        table.get("runtime_dir"), path.parent
    )


def _raw_path(value: Any, base: Path) -> Path | None:
    # The same rules as taskd.config.daemon_table's path option, minus the error messages.
    if not isinstance(value, str) or not value or "\x00" in value:
        return None
    try:
        p = Path(value).expanduser()
    except RuntimeError:  # "~nobody/x"
        return None
    return p if p.is_absolute() else base / p


def print_error_lines(lines: Iterable[str]) -> None:
    """Lines for stderr; under systemd (stderr is the journal) each carries priority <3>, so
    `journalctl -p err` shows a rejected config at start or reload."""
    from taskd.log import is_journal

    prefix = "<3>" if is_journal(sys.stderr) else ""
    for line in lines:
        print(prefix + line, file=sys.stderr)


def print_config_error(exc: ConfigError) -> None:
    n = len(exc.issues)
    print_error_lines(
        [f"taskd: config has {n} error{'s' if n != 1 else ''}:", *(f"  {i}" for i in exc.issues)]
    )


def no_such_job(name: str, known: Iterable[str], path: Path) -> int:
    hint = suggest(name, known)
    print(f"taskd: no job {name!r} in {path}" + (f"; {hint}" if hint else ""), file=sys.stderr)
    return EXIT_FAIL


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def emit(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def trust_report(exc: ConfigError, path: Path) -> tuple[list[str], list[str]]:
    """When the config file was refused as untrusted: every other trust problem its
    settings lead to (plugin folders and files, state_dir), so that one round of fixes is
    enough, and the commands that fix many at once. Nothing for another config error."""
    from taskd.config.source import UntrustedConfig

    if not isinstance(exc, UntrustedConfig):
        return [], []
    from taskd.trust_report import combined_hints, survey

    problems = survey(path.expanduser().absolute())
    known = {p.path for p in exc.problems if p.path}
    others = [p.message for p in problems if not (p.path and p.path in known)]
    return others, combined_hints(problems)


def print_trust_report(others: list[str], hints: list[str]) -> None:
    """What trust_report found, after the config error it goes with."""
    lines = []
    if others:
        lines.append("taskd: and what the config names would be refused too:")
        lines.extend(f"  {o}" for o in others)
    lines.extend(f"taskd: hint: {h}" for h in hints)
    if lines:
        print_error_lines(lines)
