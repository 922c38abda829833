"""The validated config as frozen objects. Built only by taskd.config.load."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC
from pathlib import Path
from typing import Any, Literal

ScheduleKind = Literal["every", "cron", "at", "startup"]
Overlap = Literal["skip", "queue", "replace", "allow"]
Catchup = Literal["none", "latest", "all"]
LogFormat = Literal["auto", "console", "json"]
Scope = Literal["host", "fleet"]
OnOwnerLost = Literal["retry", "abandon"]

OVERLAPS: tuple[Overlap, ...] = ("skip", "queue", "replace", "allow")
CATCHUPS: tuple[Catchup, ...] = ("none", "latest", "all")
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SCOPES: tuple[Scope, ...] = ("host", "fleet")
ON_OWNER_LOST: tuple[OnOwnerLost, ...] = ("retry", "abandon")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    plugin_dirs: tuple[Path, ...] = ()
    state_dir: Path = Path("/var/lib/taskd")
    runtime_dir: Path = Path("/run/taskd")
    log_level: str = "info"
    log_format: LogFormat = "auto"
    process_workers: int = 0  # 0: one per CPU
    thread_workers: int = 8
    # Most threads the blocking pool may have, stuck ones included; 0: 2 x thread_workers.
    # Each thread stuck in a call that outlived its run is replaced up to this cap, so the
    # default keeps full capacity through as many hangs as there are workers; the cap is
    # there because each stuck thread keeps its stack and whatever the call holds.
    thread_workers_max: int = 0
    shutdown_timeout: float = 30.0
    # The loop counts as blocked once a callback has held it this long (taskd.observe.loopwatch).
    loop_block_threshold: float = 0.25
    timezone: str = "UTC"
    metrics_address: str | None = None
    control_group: str | None = None  # members may use the control socket (mode 0660)
    entry_points: bool = True  # load installed plugins (entry point group "taskd")
    disabled_plugins: tuple[str, ...] = ()  # entry point names or drop-in file stems to skip
    # A run's result whose stored JSON text (UTF-8 bytes) is bigger fails the run, for every
    # kind of job; measured within bounds (taskd.run.encoding), for a cpu job in its worker.
    max_result_size: int = 1 << 20
    history_max_runs: int = 100_000  # runs kept in the history, the newest by start
    history_max_age: float | None = None  # seconds; runs that started longer ago go


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The ``[fleet]`` table: the PostgreSQL database through which hosts share the jobs
    with ``scope = "fleet"`` (each tick runs on one host). Times in seconds."""

    dsn: str  # postgresql://user@host/db, never with a password (taskd.config.secrets)
    password_file: Path | None = None
    password_env: str | None = None
    node: str = ""  # this host's name in the fleet; the loader fills in the host name
    lease: float = 30.0  # how long a claim holds without a heartbeat
    sweep: float = 5.0  # how often expired claims are looked for (lease/6 by default)
    claim_window: float = 3600.0  # how old a tick a catch-up run may still claim
    on_owner_lost: OnOwnerLost = "retry"
    max_takeovers: int = 3  # a run taken over this often is abandoned
    connect_timeout: float = 5.0


@dataclass(frozen=True, slots=True, init=False)
class JobConfig:
    """One ``[jobs.<name>]`` table. Equality is what a reload uses to call a job changed."""

    name: str
    type: str
    schedule: ScheduleKind
    every: float | None = None
    offset: float = 0.0  # the phase of an `every` schedule, seconds ("auto" resolved at load)
    cron: str | None = None
    at: float | None = None  # epoch seconds
    timezone: str = "UTC"
    jitter: float = 0.0
    timeout: float | None = None
    retries: int = 0
    retry_backoff: float = 1.0
    overlap: Overlap = "skip"
    catchup: Catchup = "latest"
    grace: float = 60.0
    enabled: bool = True
    max_memory: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    scope: Scope = "host"  # "fleet": each tick runs on one host of the fleet ([fleet])
    executor: str | None = None  # None: the default of the job's kind (taskd.run.executor)
    # No line of its own: Config.line_of finds it when a message needs it (a field read for
    # every job made the start scan the whole file's lines, see taskd.config.lines.KeyLines).

    def __init__(
        self,
        name: str,
        type: str,
        schedule: ScheduleKind,
        every: float | None = None,
        offset: float = 0.0,
        cron: str | None = None,
        at: float | None = None,
        timezone: str = "UTC",
        jitter: float = 0.0,
        timeout: float | None = None,
        retries: int = 0,
        retry_backoff: float = 1.0,
        overlap: Overlap = "skip",
        catchup: Catchup = "latest",
        grace: float = 60.0,
        enabled: bool = True,
        max_memory: int | None = None,
        options: Mapping[str, Any] | None = None,
        scope: Scope = "host",
        executor: str | None = None,
    ) -> None:
        # Each field set through its slot's own descriptor: the frozen dataclass's __init__
        # calls object.__setattr__ per field, 2.0 µs a job against 1.2 (10,000 jobs are
        # validated on the way to READY). Still frozen: assigning a field later raises.
        s = _JOB_SLOTS
        s[0](self, name)
        s[1](self, type)
        s[2](self, schedule)
        s[3](self, every)
        s[4](self, offset)
        s[5](self, cron)
        s[6](self, at)
        s[7](self, timezone)
        s[8](self, jitter)
        s[9](self, timeout)
        s[10](self, retries)
        s[11](self, retry_backoff)
        s[12](self, overlap)
        s[13](self, catchup)
        s[14](self, grace)
        s[15](self, enabled)
        s[16](self, max_memory)
        s[17](self, {} if options is None else options)
        s[18](self, scope)
        s[19](self, executor)

    def schedule_text(self) -> str:
        if self.schedule == "every":
            from taskd.config.durations import format_duration

            text = f"every {format_duration(self.every or 0)}"
            return f"{text} offset {format_duration(self.offset)}" if self.offset else text
        if self.schedule == "cron":
            return f"cron {self.cron!r} {self.timezone}"
        if self.schedule == "at":
            from datetime import datetime

            return f"at {datetime.fromtimestamp(self.at or 0, UTC).isoformat()}"
        return "on startup"


# The slot setters of JobConfig's fields, in field order (its __init__'s order too).
_JOB_SLOTS: tuple[Callable[[JobConfig, Any], None], ...] = tuple(
    getattr(JobConfig, f.name).__set__ for f in fields(JobConfig)
)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    daemon: DaemonConfig
    jobs: Mapping[str, JobConfig]
    # Dotted key path -> line, so later checks (job types, options) can name a line too.
    lines: Mapping[str, int] = field(default_factory=dict, compare=False)
    fleet: FleetConfig | None = None  # no [fleet] table: no job may have scope = "fleet"
    # [dask] and each [executors.<name>], by that name ("dask", "executors.<name>"): their
    # keys are the executor's to check, once plugins are loaded (taskd.plugin.executors).
    executor_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def line_of(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest enclosing table."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if "." not in path:
                return None
            path = path.rsplit(".", 1)[0]
