"""JobSet: the one table of scheduled jobs, and the only way it changes.

Start and reload both go through :meth:`JobSet.apply` (start applies the first config to an
empty set), so a job's stored cursor, its pause flag and the report of a broken job behave the
same either way. The control commands (status, trigger, pause, resume) and the drain at stop
read and act on the jobs through it too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from taskd.run.events import SkipReason
from taskd.schedule.job import ScheduledJob
from taskd.schedule.manual import ManualRun

if TYPE_CHECKING:
    from taskd.jobspec import JobSpec
    from taskd.run.runtime import Runtime
    from taskd.state.store import JobRow

# Jobs compared per step of JobSet.compare: a step is then ~50 us, far below a 5 ms slice,
# and the generator's switch is paid once per 64 jobs, not per job.
COMPARE_STEP = 64

log = structlog.get_logger("taskd.schedule")


@dataclass(frozen=True, slots=True)
class Diff:
    """What one :meth:`JobSet.apply` changed, by job name (sorted)."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    broken: tuple[str, ...] = field(default=(), compare=False)  # added or changed, and broken


class NoSuchJob(LookupError):
    """A control command named a job that is not scheduled."""


class JobSet:
    __slots__ = ("_verdicts", "jobs", "retiring", "rt")

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.jobs: dict[str, ScheduledJob] = {}
        self.retiring: list[ScheduledJob] = []  # removed by a reload, finishing a run
        # name -> (the job's spec then, the new spec, same_as): judged ahead by compare()
        self._verdicts: dict[str, tuple[JobSpec, JobSpec, bool]] = {}

    # -- applying a config ---------------------------------------------------------------------

    def compare(self, specs: Mapping[str, JobSpec]) -> Generator[None, None, None]:
        """Judge ahead, in steps (taskd.config.steps), which jobs ``specs`` leaves unchanged,
        for the next :meth:`apply`: on a reload of 10,000 jobs ``JobSpec.same_as`` was most
        of apply's ~12 ms in one piece on the loop. Only reads: a verdict is used only if
        the job still has the very spec it was judged on, so apply stays correct (and stays
        one piece: no run sees a half-applied config) whatever happens between."""
        verdicts: dict[str, tuple[JobSpec, JobSpec, bool]] = {}
        jobs = self.jobs
        for i, (name, spec) in enumerate(specs.items()):
            job = jobs.get(name)
            if job is not None:
                verdicts[name] = (job.spec, spec, job.spec.same_as(spec))
            if i % COMPARE_STEP == COMPARE_STEP - 1:
                yield
        self._verdicts = verdicts

    def apply(self, specs: Mapping[str, JobSpec], rows: Mapping[str, JobRow]) -> Diff:
        """Make the table match ``specs`` (disabled jobs are left out). ``rows`` are the stored
        job rows: a job new to the table starts from its stored cursor and pause flag, so a
        job removed and added back by a reload is treated as after a restart."""
        wanted = {n: s for n, s in specs.items() if s.config.enabled}
        verdicts, self._verdicts = self._verdicts, {}
        added: list[str] = []
        changed: list[str] = []
        removed: list[str] = []
        # A reload that keeps every job (the usual case) has nothing to remove: one comparison
        # of the key views, in C, instead of a lookup per job.
        same_names = len(wanted) == len(self.jobs) and wanted.keys() == self.jobs.keys()
        for name in () if same_names else list(self.jobs):
            if name not in wanted:
                gone = self.jobs.pop(name)
                gone.remove()
                self.rt.resources.retire(name)  # closed once its last run has ended
                if gone.active:
                    self.retiring.append(gone)
                removed.append(name)
        for name, spec in wanted.items():
            job = self.jobs.get(name)
            # Only a job new to the table can be one still retiring; looked for only then (a
            # generator per job costs 10,000 jobs' reload about 2 ms for nothing).
            back = (
                next((j for j in self.retiring if j.name == name and j.active), None)
                if job is None and self.retiring
                else None
            )
            if job is None and back is not None:
                # Removed while its run was still going: this object takes the job again, so
                # the overlap policy still sees that run.
                self.retiring.remove(back)
                back.revive(spec)
                self.jobs[name] = back
                added.append(name)
            elif job is None:
                row = rows.get(name)
                job = ScheduledJob(
                    spec,
                    self.rt,
                    cursor=row.last_tick if row else None,
                    paused=row.paused if row else False,
                )
                self.jobs[name] = job
                job.start()
                added.append(name)
            elif not _same(job.spec, spec, verdicts.get(name)):
                job.update(spec)
                # The next run opens fresh resources from the new options; runs in flight
                # keep the old ones until they end.
                self.rt.resources.retire(name)
                changed.append(name)
            else:
                job.spec = spec  # the same job; a broken one's reason may read differently
        self.retiring = [j for j in self.retiring if j.active]
        broken = []
        for name in (*added, *changed):
            error = wanted[name].broken
            if error:
                broken.append(name)
                log.error("job_broken", job=name, error=error)
        return Diff(
            tuple(sorted(added)), tuple(sorted(changed)), tuple(sorted(removed)), tuple(broken)
        )

    # -- control -------------------------------------------------------------------------------

    def get(self, name: str) -> ScheduledJob:
        job = self.jobs.get(name)
        if job is None:
            raise NoSuchJob(name)
        return job

    def trigger(self, name: str, waiter: ManualRun | None = None) -> SkipReason | None:
        """Run ``name`` now under its overlap policy; the reason when refused. ``waiter``
        learns whether it queued, and when the run starts and ends. Raises NoSuchJob."""
        return self.get(name).trigger_now(waiter)

    def set_paused(self, name: str, paused: bool) -> bool:
        """Pause or resume ``name``; False when it already was. Raises NoSuchJob."""
        changed = self.get(name).set_paused(paused)
        if changed:
            log.info("paused" if paused else "resumed", job=name)
        return changed

    def take_over(self, name: str, tick: float) -> SkipReason | None:
        """Start a taken-over fleet run of ``name``'s ``tick`` (see ScheduledJob.take_over);
        the reason when it cannot run here. Raises NoSuchJob."""
        return self.get(name).take_over(tick)

    def cancel_run(self, name: str, run_id: str, reason: str) -> bool:
        job = self.jobs.get(name)
        if job is not None and job.cancel_run(run_id, reason):
            return True
        return any(j.cancel_run(run_id, reason) for j in self.retiring if j.name == name)

    def catch_up(self, name: str, first: float, last: float) -> None:
        """Run what ``name``'s catchup picks of its skipped ticks ``first``..``last`` (see
        ScheduledJob.catch_up)."""
        job = self.jobs.get(name)
        if job is not None:
            job.catch_up(first, last)

    def clock_changed(self) -> None:
        for job in self.jobs.values():
            job.clock_changed()

    # -- reading -------------------------------------------------------------------------------

    def everyone(self) -> list[ScheduledJob]:
        return [*self.jobs.values(), *self.retiring]

    def running(self) -> int:
        return sum(len(j.active) for j in self.everyone())

    def counts(self) -> tuple[int, int, int]:
        """(runs in flight, broken jobs, paused jobs) in one pass, not three: the status line
        systemd shows is refreshed every 10 s, and with 10,000 jobs three passes (and two
        sorts) were most of an idle daemon's CPU."""
        running = broken = paused = 0
        for j in self.jobs.values():
            running += len(j.active)
            broken += bool(j.spec.broken)
            paused += bool(j.paused)
        for j in self.retiring:
            running += len(j.active)
        return running, broken, paused

    def broken(self) -> list[str]:
        return sorted(n for n, j in self.jobs.items() if j.spec.broken)

    def paused(self) -> list[str]:
        return sorted(n for n, j in self.jobs.items() if j.paused)

    def status(self, now: float | None = None) -> list[dict[str, Any]]:
        """One JSON-able row per job, scheduled ones by name, then the retiring ones."""
        now = time.time() if now is None else now
        rows = [self._row(j, now, retiring=False) for _, j in sorted(self.jobs.items())]
        rows += [self._row(j, now, retiring=True) for j in self.retiring if j.active]
        return rows

    def _row(self, job: ScheduledJob, now: float, *, retiring: bool) -> dict[str, Any]:
        spec = job.spec
        cfg = spec.config
        stats = self.rt.stats
        runs = [
            {
                "run_id": info.run_id,
                "cause": str(info.cause),
                "started": info.started,
                "scheduled": info.scheduled,
                "attempt": info.attempt,
                "for": round(now - info.started, 3),
                "in_backoff": info.in_backoff,
            }
            for _, info in job.active.values()
        ]
        if retiring:
            state = "retiring"
        elif spec.broken:
            state = "broken"
        elif job.crashed:
            state = "crashed"
        elif runs:
            state = "running"
        elif job.paused:
            state = "paused"
        else:
            state = "idle"
        last = stats.last.get(job.name)
        return {
            "name": job.name,
            "type": cfg.type,
            "kind": spec.jobtype.kind if spec.jobtype is not None else None,
            "schedule": cfg.schedule_text(),
            "state": state,
            "paused": job.paused,
            "broken": spec.broken,
            "overlap": cfg.overlap,
            "running": runs,
            "queued": len(job.queue),
            "next": None if retiring else _next_run(job, now),
            "last": None
            if last is None
            else {
                "run_id": last.run_id,
                "outcome": str(last.outcome),
                "started": last.started,
                "duration": last.duration,
                "error": last.error,
            },
            "failures": stats.failures.get(job.name, 0),
            "scope": cfg.scope,
            # A fleet job: the fleet's running claim of it (owner, fence), from its ledger.
            "fleet": _fleet_view(job) if cfg.scope == "fleet" else None,
        }

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> list[asyncio.Task[Any]]:
        """Stop scheduling everywhere; cancel runs that only wait to retry. Returns the run
        tasks the drain waits for."""
        everyone = self.everyone()
        for job in everyone:
            job.stop()  # first: no new run may start while the stopping hooks run
        for job in everyone:
            # A run waiting to retry has nothing to finish: stop it now, not at the deadline.
            for task, info in list(job.active.values()):
                if info.in_backoff:
                    info.cancel_reason = "daemon stopping"
                    task.cancel()
        return [task for job in everyone for task, _ in job.active.values()]

    def cancel_runs(self, reason: str) -> None:
        for job in self.everyone():
            job.cancel_runs(reason)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The job tasks still going."""
        return [j.task for j in self.everyone() if j.task is not None and not j.task.done()]


def _fleet_view(job: ScheduledJob) -> Any:
    view = getattr(job.ledger, "view", None)  # FleetLedger.view; NoFleetLedger has none
    return None if view is None else view(job.name)


def _next_run(job: ScheduledJob, now: float) -> float | None:
    """When the job runs next on its schedule: None when paused, broken or never again."""
    if job.paused or job.spec.broken or job.spec.trigger is None or job.crashed:
        return None
    if job.next_fire is not None and job.next_fire > now:
        return job.next_fire  # the time the job's task sleeps until, jitter included
    tick = job.spec.trigger.next_after(max(job.cursor or now, now))
    return tick


SKIP_TEXT: dict[str, str] = {
    SkipReason.OVERLAP: 'a run is already going and overlap = "skip"',
    SkipReason.QUEUE_FULL: 'too many runs already wait and overlap = "queue"',
    SkipReason.BROKEN: "the job is broken (its plugin failed to load)",
    SkipReason.SHUTDOWN: "the daemon is stopping",
    SkipReason.REMOVED: "the job was removed by a reload",
    SkipReason.REPLACED: 'a newer run replaced it (overlap = "replace")',
    SkipReason.CRASHED: "the job's scheduler crashed (see the log); restart taskd",
    SkipReason.EXHAUSTED: (
        "the thread pool is exhausted: every thread [daemon] thread_workers_max allows is "
        "stuck in a blocking call that outlived its run; fix the job that hangs (see "
        "thread_stuck in the log) and restart taskd, or raise thread_workers_max"
    ),
    SkipReason.PAUSED: "the job is paused (taskd resume runs it again)",
    SkipReason.ELSEWHERE: "another host of the fleet runs this tick",
    SkipReason.FLEET_UNAVAILABLE: (
        "the fleet database is unreachable, and a fleet job never runs unclaimed; see "
        "fleet_db_down in the log"
    ),
    SkipReason.CLOCK_SKEW: (
        "this host's clock is ahead of the fleet database's; fix its time sync (see "
        "clock_skew in the log)"
    ),
}


def _same(old: JobSpec, new: JobSpec, verdict: tuple[JobSpec, JobSpec, bool] | None) -> bool:
    """``old.same_as(new)``, from the verdict compare() gave if it was on these very specs."""
    if verdict is not None and verdict[0] is old and verdict[1] is new:
        return verdict[2]
    return old.same_as(new)
