"""Config + loaded plugins -> JobSpecs: each job's type, trigger and checked options."""

from __future__ import annotations

from taskd.config.checks import suggest
from taskd.config.job_table import NO_OPTIONS
from taskd.config.model import Config
from taskd.config.steps import Steps, finish
from taskd.errors import ConfigIssue
from taskd.jobspec import JobSpec, make_trigger
from taskd.plugin.executors import ExecutorCheck
from taskd.plugin.manager import PluginHost
from taskd.plugin.options import OptionSpec, check_options, convert_options
from taskd.schedule.triggers import At, Every, Trigger


def resolve(config: Config, host: PluginHost) -> tuple[dict[str, JobSpec], list[ConfigIssue]]:
    """Resolve every job. Config mistakes become issues; a job whose plugin is broken becomes a
    broken JobSpec (it is shown, not dropped, and the rest still run)."""
    return finish(resolve_steps(config, host))


def resolve_steps(
    config: Config, host: PluginHost
) -> Steps[tuple[dict[str, JobSpec], list[ConfigIssue]]]:
    """:func:`resolve` in steps of one job (taskd.config.steps), for a reload on the loop."""
    specs: dict[str, JobSpec] = {}
    issues: list[ConfigIssue] = []
    file = str(config.path)
    # Per job type, not per job: thousands of jobs share a handful of types.
    option_specs: dict[str, OptionSpec] = {}
    # One trigger per distinct schedule: an Every or an At is a value (frozen, no state), and
    # thousands of jobs share a few intervals; ~96 bytes a job the daemon keeps otherwise.
    # Not a Cron: it keeps its position in the minute stream, one per job.
    triggers: dict[Trigger, Trigger] = {}
    # The same by (every, offset), looked up before an Every is built (its checks are most
    # of a trigger's cost, and 10,000 every jobs would build 10,000 to find a few).
    everies: dict[tuple[float | None, float], Trigger | None] = {}

    def issue(path: str, message: str, hint: str | None = None) -> None:
        issues.append(ConfigIssue(file, path, message, config.line_of(path), hint))

    executors = ExecutorCheck(config.executor_tables, host.executors, issue)

    for name, job in config.jobs.items():
        yield
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
        ospec = option_specs.get(job.type)
        if ospec is None:
            ospec = option_specs[job.type] = OptionSpec.of(jt)
        problems = check_options(jt, job.options, ospec)
        for key, message, option_hint in problems:
            issue(f"{path}.options.{key}" if key else f"{path}.options", message, option_hint)
        placed, executor = (True, None) if job.executor is None else executors.job(path, job, jt)
        if job.max_memory is not None and jt.kind != "cpu":
            issue(
                f"{path}.max_memory",
                f"max_memory applies to cpu jobs only; {job.type!r} is a {jt.kind} job",
                "remove max_memory",
            )
        elif placed and not problems:
            every = (job.every, job.offset) if job.schedule == "every" else None
            trigger = everies.get(every) if every is not None else None
            if trigger is None:
                trigger = make_trigger(job)
                if isinstance(trigger, Every | At):
                    trigger = triggers.setdefault(trigger, trigger)
                if every is not None:
                    everies[every] = trigger
            specs[name] = JobSpec(
                job,
                jt,
                trigger,
                kwargs=convert_options(jt, job.options, ospec) if job.options else NO_OPTIONS,
                executor=executor,
            )
    executors.other_tables()
    return specs, issues
