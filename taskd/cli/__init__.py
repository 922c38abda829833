"""The ``taskd`` command. Exit codes: 0 done, 1 failed (an invalid config, a failed run under
``--wait``, a refused request), 2 usage, 3 no daemon running (commands that need one) or, for
``taskd run``, state_dir held by another daemon; ``taskd run`` exits 78 (EX_CONFIG) on an
invalid config, so systemd can tell "fix the file" from a crash worth restarting."""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from taskd._version import __version__

TYPE_CHECKING = False  # not typing's: see taskd/__init__.py
# The largest -n (history, next): about what history retention keeps, and `next -n` lists that
# many times in about a second (a billion would take hours and gigabytes).
MAX_COUNT = 100_000
if TYPE_CHECKING:
    import argparse

# Only light imports above: `taskd run` installs its signal handlers in main(), and everything
# imported before that is time in which a SIGHUP or SIGTERM kills the daemon outright.

# -- early signals -----------------------------------------------------------------------------

EARLY_SIGNALS: list[int] = []
"""The signals ``taskd run`` received before its event loop listens, oldest first. The
daemon adopts this list (``Daemon.install_early_signal_handlers``) and acts on each once it
listens: a SIGTERM then stops the start, a SIGHUP reloads once started."""


def _record(signum: int, frame: FrameType | None) -> None:
    # Only record: the handler runs between any two bytecodes of the main thread, half-way
    # through an import, so acting here (logging, raising) could leave things half done.
    EARLY_SIGNALS.append(signum)


def install_early_signal_handlers() -> None:
    """Record SIGHUP, SIGTERM and SIGINT instead of dying of them (or raising
    KeyboardInterrupt). Nothing before this can be covered: the interpreter's own start-up,
    about 15-30 ms after exec, runs with the default actions."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _record)


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``, without argparse: the first word that is not an
    option (the top-level parser has only -h and --version, which take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: see the note on imports above.
    import argparse

    from taskd.cli import history_args
    from taskd.config import DEFAULT_CONFIG

    local = "taskd.cli.local"
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

    add("run", "run the daemon in the foreground").set_defaults(func=_lazy(local, "cmd_run"))
    p = add("check", "validate the config and plugins; exit 1 listing every error")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_lazy(local, "cmd_check"))
    p = add("plugins", "list plugins, where they come from, and their job types")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show options and tracebacks")
    p.add_argument("--plugin-dir", action="append", default=[], help="also scan this folder")
    p.set_defaults(func=_lazy(local, "cmd_plugins"))
    p = add("next", "show a job's upcoming run times (no daemon needed)")
    p.add_argument("job")
    p.add_argument("-n", type=int, default=10, help="how many (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_lazy(local, "cmd_next"))
    p = add("exec", "run one job once in the foreground and print its result")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-retries", action="store_true", help="one attempt only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "-o",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='set an option for this run; VALUE is a TOML value (3, true, ["a", "b"]) or a bare string',
    )
    p.set_defaults(func=_lazy("taskd.cli.execjob", "cmd_exec"))
    p = sub.add_parser(
        "new-plugin",
        help="write a plugin file with one job of each kind, and its tests",
        description="write NAME.py (one io, one blocking, one cpu job) and test_NAME.py "
        "(its tests, run the way the daemon runs the jobs) into a folder",
    )
    p.add_argument("name", help="the plugin's name, e.g. disk_watch (its job types are NAME_*)")
    p.add_argument("-d", "--dir", default=".", help="the folder to write to (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_lazy("taskd.cli.scaffold", "cmd_new_plugin"))
    p = add("history", "show past runs from the state database (no daemon needed)")
    history_args.add_arguments(p)
    p.set_defaults(func=_lazy("taskd.cli.history", "cmd_history"))

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


def _tolerant_stdout() -> None:
    """A character stdout cannot encode (a lone surrogate from a stored result, anything
    past ASCII under LANG=C) prints as a backslash escape instead of ending the command
    with UnicodeEncodeError, as stderr already does. The printers escape what a terminal
    would act on themselves (taskd.cli.fmt.safe); this is the net under whatever they miss.
    Not for ``taskd run``, whose log lines are JSON, ASCII already."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    if _command(sys.argv[1:] if argv is None else argv) == "run":
        # First thing, before the imports that parsing and the daemon need (100-200 ms).
        install_early_signal_handlers()
        # No cyclic collections while the start builds what lives as long as the daemon
        # (modules, config, one task per job): 10,000 jobs took about 40 ms of them, each
        # walking everything built so far. The start collects once, freezes what it built
        # and enables the collector again (taskd.daemon.start).
        gc.disable()
    from taskd.cli.common import EXIT_USAGE

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if not 1 <= getattr(args, "n", 1) <= MAX_COUNT:
        parser.error(f"-n must be from 1 to {MAX_COUNT}")
    if args.command != "run":
        _tolerant_stdout()
    else:
        # The config parses in a process of its own (taskd.config.source): started here,
        # before cmd_run's module and the validation are imported (about 50 ms), it runs
        # on another core meanwhile. Its errors are raised where cmd_run handles them.
        from taskd.config.source import config_file, start_parse

        args.parse = start_parse(config_file(args.config))
    try:
        code: int = args.func(args)
        if args.command != "run":
            sys.stdout.flush()  # here, where a closed pipe can still be caught
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if args.command == "run":
            raise
        return _reader_gone()
    return code


def _reader_gone() -> int:
    """``taskd status | head``: the reader left before all was printed. Quietly, as a shell
    tool does: no traceback, and stdout pointed at /dev/null so the interpreter's final
    flush cannot fail again. 141 is what a shell reports for a command killed by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
