"""JobSpec: one job ready to schedule (its config, job type, trigger and converted options).

Made by the plugin layer (taskd.plugin.resolve), used by the schedule and run layers and the
CLI; a module of its own so that none of them imports the plugin layer for it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from taskd.config.model import JobConfig
from taskd.plugin.jobtype import JobType
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
    # Where its runs go when not its kind's default executor (taskd.run.executor): the
    # default paths read None and never look an executor up.
    executor: str | None = field(default=None, compare=False)
    # Eligible for the scheduler's fused run path (taskd.schedule.runs, _run_fast): decided
    # once, here, when a build or reload makes the spec, never per run.
    fast: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        cfg, jt = self.config, self.jobtype
        # The common run, and all the fused path handles: an ``every`` tick, run in the job's
        # own task (overlap "skip" or "queue"), an io job with no timeout and no retries, of
        # this host alone (a fleet job's run is claimed first, which the fused path cannot).
        # Any other job (or one a reload turns into one) takes the general path.
        fast = (
            self.broken is None
            and cfg.scope == "host"
            and jt is not None
            and jt.kind == "io"
            and isinstance(self.trigger, Every)
            and cfg.overlap in ("skip", "queue")
            and cfg.timeout is None
            and cfg.retries == 0
        )
        object.__setattr__(self, "fast", fast)

    @property
    def name(self) -> str:
        return self.config.name

    def same_as(self, other: JobSpec) -> bool:
        """Unchanged for a reload: same config and the very same job function."""
        # Broken or not, not why: a broken job's reason names every plugin that failed, and
        # one more failing plugin does not change the job.
        if self.config != other.config or (self.broken is None) != (other.broken is None):
            return False
        if self.jobtype is None or other.jobtype is None:
            return self.jobtype is other.jobtype
        return self.jobtype.func is other.jobtype.func and self.jobtype.kind == other.jobtype.kind


def make_trigger(job: JobConfig) -> Trigger | None:
    if job.schedule == "every":
        assert job.every is not None
        return Every(job.every, offset=job.offset)
    if job.schedule == "cron":
        assert job.cron is not None
        return Cron(job.cron, ZoneInfo(job.timezone))
    if job.schedule == "at":
        assert job.at is not None
        return At(job.at)
    return None
