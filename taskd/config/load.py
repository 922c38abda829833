"""TOML file -> validated, frozen :class:`Config`. Every problem is collected, not just the first.

This checks the config's own shape. Whether a job's ``type`` exists and its ``options`` fit
the job function is checked against the loaded plugins by :mod:`taskd.plugin.resolve`.
The [daemon] table is read by daemon_table.py, [fleet] by fleet_table.py, each job's table by
job_table.py."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from taskd.config.checks import _Collector, suggest, type_name
from taskd.config.daemon_table import _daemon
from taskd.config.executor_tables import EXECUTOR_TOP_KEYS, executor_tables
from taskd.config.fleet_table import _fleet, check_scope
from taskd.config.job_table import _job
from taskd.config.model import Config, DaemonConfig, JobConfig
from taskd.config.source import (
    Parse,
    open_config,
    read_open_toml,
    read_toml,
    start_parse,
)
from taskd.config.steps import Steps, finish
from taskd.errors import ConfigError, ConfigIssue

TOP_KEYS = ("daemon", "fleet", "jobs", *EXECUTOR_TOP_KEYS)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem found."""
    return ConfigRead(path).load()


class ConfigRead:
    """load_config, started: the file opened and checked and its parse under way in the
    parser's process (taskd.config.source.Parse) when this returns; :meth:`load` waits for
    it and validates. ``taskd run`` starts it before importing the daemon, which then costs
    no time of its own on a machine with a core to spare. Every problem, opening the file
    included, is raised by :meth:`load`, so the caller handles ConfigError in one place."""

    def __init__(self, path: str | Path, started: Parse | ConfigError | None = None) -> None:
        """``started``: start_parse(path) if the caller has already called it (taskd.cli
        does, before it imports this module)."""
        self._file = Path(path).expanduser().absolute()
        self._parse = started if started is not None else start_parse(self._file)

    def load(self) -> Config:
        if isinstance(self._parse, ConfigError):
            raise self._parse
        data, lines = self._parse.document()
        config, issues, by_job = finish(_validate(self._file, data, lines))
        if issues or by_job:
            raise ConfigError([*issues, *(i for found in by_job.values() for i in found)])
        return config


def load_config_for_job(path: str | Path, job: str) -> tuple[Config, dict[str, list[ConfigIssue]]]:
    """The config for running one job (``taskd exec``): raises ConfigError for a problem
    outside ``[jobs]`` or in that job's table; the other invalid jobs' problems come back
    beside the config (by job name), which holds only the valid jobs."""
    config, issues, by_job = _read(path)
    own = by_job.pop(job, [])
    if issues or own:
        raise ConfigError([*issues, *own])
    return config, by_job


def job_from_table(name: str, table: Mapping[str, Any], *, file: str = "<jobs>") -> JobConfig:
    """One ``[jobs.<name>]`` table given as a dict (taskd.testing), read exactly as from a
    config file: durations, sizes, bounds, unknown keys. Raises ConfigError naming ``file``."""
    c = _Collector(Path(file), {})
    job = _job(c, name, dict(table), "UTC")
    if c.issues or job is None:
        raise ConfigError(c.issues)
    return job


def _read(path: str | Path) -> tuple[Config, list[ConfigIssue], dict[str, list[ConfigIssue]]]:
    """The config with its valid jobs; the issues outside any job; each invalid job's issues."""
    return finish(_validate(*read_document(path)))


def read_document(path: str | Path) -> tuple[Path, dict[str, Any], Mapping[str, int]]:
    """The config file's absolute path, its TOML document and its key -> line map: the part
    of :func:`load_config` that reads the file (in a process of its own, see
    taskd.config.source). Raises ConfigError when the file cannot be read or parsed."""
    file = Path(path).expanduser().absolute()
    fd = open_config(file)
    try:
        data, lines = read_open_toml(file, fd)
    finally:
        os.close(fd)
    return file, data, lines


def validate_steps(file: Path, data: dict[str, Any], lines: Mapping[str, int]) -> Steps[Config]:
    """The rest of :func:`load_config`, on what :func:`read_document` returned, in steps of
    one job (taskd.config.steps): a reload validates on the loop, a slice at a time."""
    config, issues, by_job = yield from _validate(file, data, lines)
    if issues or by_job:
        raise ConfigError([*issues, *(i for found in by_job.values() for i in found)])
    return config


def daemon_settings(path: str | Path) -> DaemonConfig | None:
    """The [daemon] table of a config file that may not pass load_config (refused, or
    invalid elsewhere), invalid values left at their defaults; None when the file cannot be
    read or parsed. For reports that name the plugin folders and state_dir it would use
    (taskd.trust_report); nothing of it is acted on."""
    file = Path(path).expanduser().absolute()
    try:
        data, lines = read_toml(file)
    except ConfigError:
        return None
    return _daemon(_Collector(file, lines), data.get("daemon", {}), file.parent)


def _validate(
    file: Path, data: dict[str, Any], lines: Mapping[str, int]
) -> Steps[tuple[Config, list[ConfigIssue], dict[str, list[ConfigIssue]]]]:
    c = _Collector(file, lines)
    base = file.parent

    for key in data:
        if key not in TOP_KEYS:
            c.add(
                key,
                f"unknown top-level key {key!r}",
                suggest(key, TOP_KEYS)
                or "the top level has [daemon], [fleet] and [jobs.<name>] tables",
            )

    daemon = _daemon(c, data.get("daemon", {}), base)
    fleet = _fleet(c, data.get("fleet"), base)
    jobs_table = data.get("jobs", {})
    jobs: dict[str, JobConfig] = {}
    by_job: dict[str, list[ConfigIssue]] = {}
    if not isinstance(jobs_table, dict):
        c.add("jobs", f"expected tables [jobs.<name>], got {type_name(jobs_table)}")
    else:
        for name, table in jobs_table.items():
            before = len(c.issues)
            job = _job(c, name, table, daemon.timezone)
            if job is not None:
                check_scope(c, job, fleet)
            if len(c.issues) > before:
                by_job[name] = c.issues[before:]
                del c.issues[before:]
            if job is not None:
                jobs[name] = job
            yield
    config = Config(path=file, daemon=daemon, jobs=jobs, lines=c.lines, fleet=fleet)
    if any(k in data for k in EXECUTOR_TOP_KEYS):
        config = dataclasses.replace(config, executor_tables=executor_tables(c, data))
    return config, c.issues, by_job
