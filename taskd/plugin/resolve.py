"""Config + loaded plugins -> JobSpecs: each job's type, trigger and checked options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from taskd.config.load import suggest
from taskd.config.model import Config, JobConfig
from taskd.errors import ConfigIssue
from taskd.plugin.jobtype import JobType
from taskd.plugin.manager import PluginHost
from taskd.plugin.options import check_options, convert_options
from taskd.schedule.triggers import At, Cron, Every, Trigger


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job ready to schedule. ``broken`` says why it cannot run (its plugin failed)."""

    config: JobConfig
    jobtype: JobType | None
    trigger: Trigger | None  # None for on = "startup"
    broken: str | None = None
    # The options as the job function receives them (converted per its annotations).
    kwargs: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return self.config.name

    def same_as(self, other: JobSpec) -> bool:
        """Unchanged for a reload: same config and the very same job function."""
        if self.config != other.config or self.broken != other.broken:
            return False
        if self.jobtype is None or other.jobtype is None:
            return self.jobtype is other.jobtype
        return self.jobtype.func is other.jobtype.func and self.jobtype.kind == other.jobtype.kind


def make_trigger(job: JobConfig) -> Trigger | None:
    if job.schedule == "every":
        assert job.every is not None
        return Every(job.every)
    if job.schedule == "cron":
        assert job.cron is not None
        return Cron(job.cron, ZoneInfo(job.timezone))
    if job.schedule == "at":
        assert job.at is not None
        return At(job.at)
    return None


def resolve(config: Config, host: PluginHost) -> tuple[dict[str, JobSpec], list[ConfigIssue]]:
    """Resolve every job. Config mistakes become issues; a job whose plugin is broken becomes a
    broken JobSpec (it is shown, not dropped, and the rest still run)."""
    specs: dict[str, JobSpec] = {}
    issues: list[ConfigIssue] = []
    file = str(config.path)

    def issue(path: str, message: str, hint: str | None = None) -> None:
        issues.append(ConfigIssue(file, path, message, config.line_of(path), hint))

    for name, job in config.jobs.items():
        path = f"jobs.{name}"
        jt = host.job_types.get(job.type)
        if jt is None:
            why = host.why_missing(job.type)
            if why is not None:
                specs[name] = JobSpec(job, None, make_trigger(job), broken=why)
                continue
            known = sorted(host.job_types)
            hint = suggest(job.type, known) or (
                f"known job types: {', '.join(known)}"
                if known
                else "no plugin provides any job type; check plugin_dirs"
            )
            issue(f"{path}.type", f"unknown job type {job.type!r}", hint)
            continue
        problems = check_options(jt, job.options)
        for key, message, option_hint in problems:
            issue(f"{path}.options.{key}" if key else f"{path}.options", message, option_hint)
        if job.max_memory is not None and jt.kind != "cpu":
            issue(
                f"{path}.max_memory",
                f"max_memory applies to cpu jobs only; {job.type!r} is a {jt.kind} job",
                "remove max_memory",
            )
        elif not problems:
            specs[name] = JobSpec(
                job, jt, make_trigger(job), kwargs=convert_options(jt, job.options)
            )
    return specs, issues
