"""The ``taskd`` command. Exit codes: 0 done, 1 failed (an invalid config, a failed run under
``--wait``, a refused request), 2 usage, 3 no daemon running (commands that need one) or, for
``taskd run``, state_dir held by another daemon; ``taskd run`` exits 78 (EX_CONFIG) on an
invalid config, so systemd can tell "fix the file" from a crash worth restarting."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from taskd._version import __version__
from taskd.cli import history
from taskd.cli.common import EXIT_USAGE
from taskd.cli.local import cmd_check, cmd_exec, cmd_next, cmd_plugins, cmd_run
from taskd.config import DEFAULT_CONFIG

# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskd", description="A pluggable async task-runner daemon."
    )
    parser.add_argument("--version", action="version", version=f"taskd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "-c", "--config", help=f"config file (default: $TASKD_CONFIG or {DEFAULT_CONFIG})"
        )
        return p

    add("run", "run the daemon in the foreground").set_defaults(func=cmd_run)
    p = add("check", "validate the config and plugins; exit 1 listing every error")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)
    p = add("plugins", "list plugins, where they come from, and their job types")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show options and tracebacks")
    p.add_argument("--plugin-dir", action="append", default=[], help="also scan this folder")
    p.set_defaults(func=cmd_plugins)
    p = add("next", "show a job's upcoming run times (no daemon needed)")
    p.add_argument("job")
    p.add_argument("-n", type=int, default=10, help="how many (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_next)
    p = add("exec", "run one job once in the foreground and print its result")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-retries", action="store_true", help="one attempt only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_exec)
    p = add("history", "show past runs from the state database (no daemon needed)")
    history.add_arguments(p)
    p.set_defaults(func=history.cmd_history)

    def remote(
        name: str, help: str, *, job: bool = False, json: bool = True
    ) -> argparse.ArgumentParser:
        p = add(name, help)
        if job:
            p.add_argument("job")
        if json:
            p.add_argument("--json", action="store_true", help="print the reply as JSON")
        p.add_argument(
            "--socket",
            help="the daemon's control socket (default: $TASKD_SOCKET or runtime_dir/control.sock of the config)",
        )
        p.set_defaults(func=_lazy("taskd.cli.remote", f"cmd_{name}"))
        return p

    remote("status", "the daemon and its jobs at a glance (exit 3 if no daemon runs)")
    p = remote("jobs", "each job: state, next and last run, outcome, consecutive failures")
    p.add_argument("job", nargs="?", help="only this job")
    p = remote("trigger", "run a job now, under its overlap policy", job=True)
    p.add_argument("--wait", action="store_true", help="wait for the run; exit 1 if it failed")
    remote("pause", "stop running a job on schedule (persists across restarts)", job=True)
    remote("resume", "run a paused job on schedule again; missed ticks follow catchup", job=True)
    remote("reload", "reload the config and plugins; exit 1 with the errors if invalid")
    return parser


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command imported when it runs: `taskd run` must not pay for the others' imports."""

    def call(args: argparse.Namespace) -> int:
        func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return func(args)

    return call


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "n", 1) < 1:
        parser.error("-n must be at least 1")
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
