"""``taskd exec JOB``: run one job once in the foreground, through the daemon's runner, and
print its result. Other jobs in the file do not matter: one with an invalid table, an unknown
type, wrong options or a broken plugin is a warning, not a refusal. ``-o key=value``
overrides the job's options for this run (taskd.cli.overrides)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from taskd.cli import fmt
from taskd.cli.common import EXIT_FAIL, EXIT_OK, config_path, emit, print_config_error
from taskd.errors import ConfigError, ConfigIssue


def cmd_exec(args: argparse.Namespace) -> int:
    from taskd import log as logsetup
    from taskd.cli.overrides import OverrideError, apply_overrides, parse_override
    from taskd.config.checks import suggest
    from taskd.config.load import load_config_for_job
    from taskd.loop import run
    from taskd.plugin.manager import PluginHost
    from taskd.plugin.resolve import resolve

    path = config_path(args)
    try:
        overrides = [parse_override(text) for text in args.overrides]
    except OverrideError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        config, others = load_config_for_job(path, args.job)
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_FAIL
    # Logs to stderr so stdout holds only the result.
    logsetup.configure(
        "debug" if args.verbose else config.daemon.log_level,
        "console" if not args.json else "json",
        sys.stderr,
    )
    job = config.jobs.get(args.job)
    if job is None:
        hint = suggest(args.job, [*config.jobs, *others])
        print(
            f"taskd: no job {args.job!r} in {config.path}" + (f"; {hint}" if hint else ""),
            file=sys.stderr,
        )
        return EXIT_FAIL
    if overrides:
        job = dataclasses.replace(job, options=apply_overrides(job.options, overrides))
    d = config.daemon
    host = PluginHost.load(d.plugin_dirs, entry_points=d.entry_points, disabled=d.disabled_plugins)
    # This job is resolved on its own: another job's unknown type, wrong options or broken
    # plugin is only a warning.
    rest = {name: j for name, j in config.jobs.items() if name != job.name}
    rest_specs, rest_issues = resolve(dataclasses.replace(config, jobs=rest), host)
    for issue in rest_issues:
        others.setdefault(issue.path.split(".")[1], []).append(issue)
    for name, other in rest_specs.items():
        if other.broken:
            others.setdefault(name, []).append(
                ConfigIssue(
                    str(config.path),
                    f"jobs.{name}",
                    f"job is broken: {other.broken}",
                    config.line_of(f"jobs.{name}"),
                )
            )
    if others:
        _warn_others(others)
    specs, issues = resolve(dataclasses.replace(config, jobs={job.name: job}), host)
    if issues:
        _print_issues(issues, overrides)
        return EXIT_FAIL
    spec = specs[job.name]
    if spec.broken:
        print(f"taskd: job {args.job!r} is broken: {fmt.safe(str(spec.broken))}", file=sys.stderr)
        return EXIT_FAIL
    info = run(_exec_once(config, host, spec, retries=not args.no_retries))
    out = {
        "job": info.job,
        "run_id": info.run_id,
        "outcome": info.outcome,
        "attempts": info.attempt,
        "error": info.error,
        "result": info.result,
    }
    if args.json:
        emit(out)
    elif info.outcome == "succeeded":
        print(
            json.dumps(info.result, indent=2, default=repr)
            if info.result is not None
            else "(no result)"
        )
    else:
        error = fmt.safe_lines(str(info.error))
        print(f"taskd: job {info.job!r} {info.outcome}: {error}", file=sys.stderr)
    return EXIT_OK if info.outcome == "succeeded" else EXIT_FAIL


def _warn_others(others: dict[str, list[ConfigIssue]]) -> None:
    n = len(others)
    print(
        f"taskd: warning: {n} other job{'s' if n != 1 else ''} in the config "
        f"{'have' if n != 1 else 'has'} errors (not run; `taskd check` lists every error):",
        file=sys.stderr,
    )
    for found in others.values():
        for issue in found:
            print(f"  {issue}", file=sys.stderr)


def _print_issues(issues: list[ConfigIssue], overrides: list[Any]) -> None:
    """The job's problems; one an ``-o`` caused names the ``-o`` rather than the file."""
    lines = []
    for issue in issues:
        parts = issue.path.split(".options.", 1)
        option = parts[1] if len(parts) == 2 else None
        given = [o for o in overrides if option is not None and o.keys[0] == option]
        if given:
            text = f"-o {given[-1].text}: {issue.message}"
            lines.append(text + (f" ({issue.hint})" if issue.hint else ""))
        else:
            lines.append(str(issue))
    n = len(lines)
    print(f"taskd: config has {n} error{'s' if n != 1 else ''}:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)


async def _exec_once(config: Any, host: Any, spec: Any, *, retries: bool) -> Any:
    from taskd.ledger import NULL_LEDGER
    from taskd.run.events import Cause
    from taskd.run.runner import RunInfo, execute
    from taskd.run.runtime import Runtime
    from taskd.state.shared import SharedState

    d = config.daemon
    if not retries:
        spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, retries=0))
    rt = Runtime(
        shared=SharedState(),
        host=host,
        thread_workers=d.thread_workers,
        process_workers=min(d.process_workers or 1, 2),
        thread_workers_max=d.thread_workers_max,
        max_result_size=d.max_result_size,
        executor_tables=config.executor_tables,  # a dask job runs on its [dask] cluster
    )
    now = time.time()
    info = RunInfo(rt.new_run_id(), spec.name, now, now, Cause.EXEC)
    try:
        # NULL_LEDGER: trying a job must not move the daemon's schedule or history.
        await execute(rt, spec, info, NULL_LEDGER)
    finally:
        await rt.close(kill=True)
    return info
