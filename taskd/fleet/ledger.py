"""FleetLedger: the ledger of ``scope = "fleet"`` jobs. Each run is claimed in the fleet's
PostgreSQL first (one row per tick: exactly one host runs it), then goes on this host's
own record (a LocalLedger) like a host run. The database never sits on a host job's path.

What this module holds is the bookkeeping of claims on this host: the claims held (each with
its local deadline), the takeover claims the sweep got and the runs they start, the pause
flags, and what status shows. The tasks that keep claims alive, take over lost ones and write
finished runs are in taskd.fleet.loops."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import socket
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

import structlog

from taskd.fleet.conn import FleetDown, version
from taskd.fleet.db import FleetDB, NodeTaken
from taskd.fleet.flags import PauseFlags
from taskd.fleet.held import Held, Scheduler, boottime, spec_hash
from taskd.fleet.schema import SchemaTooNew
from taskd.ledger import Claim, LocalLedger, NotClaimed
from taskd.run.events import Cause, Outcome, SkipReason

if TYPE_CHECKING:
    from taskd.config.model import FleetConfig, JobConfig
    from taskd.run.runner import RunInfo
    from taskd.run.sinks import RunEnd
    from taskd.state.shared import SharedState

log = structlog.get_logger("taskd.fleet")

_REASONS: Final = {
    "paused": SkipReason.PAUSED,
    "taken": SkipReason.ELSEWHERE,
    "overlap": SkipReason.OVERLAP,
    "late": SkipReason.MISSED,
    "early": SkipReason.CLOCK_SKEW,  # early twice: this host's clock runs ahead of the DB's
    "unknown": SkipReason.FLEET_UNAVAILABLE,
}
_STATES: Final = frozenset({"succeeded", "failed", "timed_out", "cancelled"})
DEADLINE_CHECK: Final = 1.0  # the longest a passed local deadline goes unnoticed (suspend)


class FleetLedger(PauseFlags):
    """A :class:`~taskd.ledger.Ledger` for fleet jobs: ``open_run`` returns None, so the
    runner awaits :meth:`claim`, which asks the database and never waits for it when it is
    down (:data:`SkipReason.FLEET_UNAVAILABLE` at once)."""

    may_refuse: ClassVar[bool] = True

    def __init__(self, local: LocalLedger, db: FleetDB, cfg: FleetConfig) -> None:
        self.local = local
        self.db = db
        self.cfg = cfg
        self.node = db.node
        self.lease = cfg.lease
        # A claim is trusted locally until lease - margin after its heartbeat was *sent*:
        # the database's now() is later than the send, so its lease outlives ours.
        self.margin = max(1.0, cfg.lease / 10)
        self.jobs: dict[str, JobConfig] = {}
        self.held: dict[int, Held] = {}
        self.granted: dict[tuple[str, float], tuple[Claim, float]] = {}
        self.flags: dict[str, bool] = {}  # the fleet's pause flags, as last known
        # Their versions (paused_at, µs): answers reach this host on two connections in no
        # set order, and one older than the flag applied is ignored.
        self.flag_at: dict[str, int] = {}
        # The first and last tick of each job skipped while the DB was down (to catch up).
        self.held_from: dict[str, tuple[float, float]] = {}
        self.running: dict[str, Mapping[str, Any]] = {}  # status: the fleet's running claims
        self.scheduler: Scheduler | None = None
        self.claims_lost = 0
        self.skew = 0.0
        self.history_max_age: float | None = None  # [daemon] history_max_age: retention
        self.sweeps = 0
        self.draining = False  # the daemon is stopping: no more takeovers
        self.handed_back: dict[int, float] = {}  # fence -> until when (boottime) not swept
        # (the claim, the run's end or None for a tick given back, the finish's values)
        self.writes: asyncio.Queue[tuple[Held, RunEnd | None, tuple[Any, ...]]] = asyncio.Queue()
        # Per job, the claims whose finish is queued: their rows are still running.
        self.unwritten: dict[str, dict[int, Held]] = {}
        self.ready = False  # schema, node check, jobs and LISTEN done
        self._deadline: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._publishing: set[asyncio.Task[None]] = set()
        db.conn.on_up(self._back_up)

    @classmethod
    def build(cls, local: LocalLedger, cfg: FleetConfig, version: str = "") -> FleetLedger:
        return cls(local, FleetDB(cfg, cfg.node or socket.gethostname(), version), cfg)

    # -- life --------------------------------------------------------------------------------

    async def start(self, scheduler: Scheduler, jobs: Iterable[JobConfig]) -> None:
        """:meth:`open`, then :meth:`attach` (the tests' one step)."""
        await self.open(jobs)
        self.attach(scheduler)

    async def open(self, jobs: Iterable[JobConfig]) -> None:
        """Connect, migrate, check the node name, register ``jobs``, listen for pauses.
        Never raises: a database that cannot be reached is retried with backoff (fleet jobs
        are skipped as fleet_unavailable meanwhile), a schema too new or a node name in use
        refuses the fleet jobs for good, with the reason in each skip."""
        self.jobs = {cfg.name: cfg for cfg in jobs}
        try:
            await self.db.conn.open()
            await self._prepare()
        except (SchemaTooNew, NodeTaken) as exc:
            self._refuse(exc)
        except Exception as exc:
            # Unreachable, or refused (a wrong password, no such database): all may be
            # fixed without a restart of taskd, so retried with backoff all the same.
            log.warning("fleet_db_down", node=self.node, error=f"{type(exc).__name__}: {exc}",
                        hint="fleet jobs are skipped until the database answers")  # fmt: skip
            self.db.conn.gone(exc)

    async def _prepare(self) -> None:
        await self.db.prepare()
        await self.register(self.jobs.values())
        await self.db.listen(self._notice, self._resync)
        self.ready = True

    def _refuse(self, exc: Exception) -> None:
        log.error("fleet_refused", node=self.node, error=str(exc))
        self.db.conn.refuse(str(exc))

    def attach(self, scheduler: Scheduler) -> None:
        """The scheduler is there (its jobs hold this ledger): apply the fleet's pause
        flags and start the heartbeat, sweep and writer."""
        from taskd.fleet import loops

        self.scheduler = scheduler
        for job, paused in self.flags.items():
            self._apply_flag(job, paused)
        self._tasks = loops.start(self)

    def reconfigure(self, jobs: Iterable[JobConfig]) -> None:
        """A reload changed the fleet jobs: register them (a task; a database that is down
        registers them when it is back)."""
        self.jobs = {cfg.name: cfg for cfg in jobs}
        if self.ready and self.db.state == "up":
            task = asyncio.get_running_loop().create_task(self._register_quietly())
            self._tasks.append(task)

    async def _register_quietly(self) -> None:
        with contextlib.suppress(FleetDown):  # registered again after the reconnect
            await self.register(self.jobs.values())

    async def register(self, jobs: Iterable[JobConfig]) -> None:
        """The fleet jobs (at start and after a reload): their rows, their pause flags, and
        a warning for each whose config another node started with differently."""
        self.jobs = {cfg.name: cfg for cfg in jobs}
        if not self.jobs:
            return
        rows = await self.db.register({n: spec_hash(c) for n, c in self.jobs.items()})
        for row in rows:
            if row["differs"]:
                log.warning(
                    "fleet_config_differs",
                    job=row["job"],
                    node=self.node,
                    other=row["other"],
                    hint="every host of a fleet job needs the same schedule, or each runs "
                    "its own ticks",
                )
            self._apply_flag(row["job"], bool(row["paused"]), version(row["paused_at"]))

    def drain(self) -> None:
        """The daemon is stopping: take over no more ticks (they could not run here), and
        give the runs the drain cancels back to the fleet rather than end them."""
        self.draining = True

    async def close(self, timeout: float = 2.0) -> None:
        """Stop the loops; give queued finishes ``timeout`` to be written; disconnect."""
        if self._deadline is not None:
            self._deadline.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.writes.join(), timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Finishes never written: on this host's record as they ended (the fleet's rows
        # stay running; a sweep elsewhere decides on them).
        while not self.writes.empty():
            held, end, _ = self.writes.get_nowait()
            self.written(held)
            self.release(held)
            if end is not None:
                self.local.finish(end)
        await self.db.close()

    # -- the Ledger protocol ---------------------------------------------------------------

    def advance(self, job: str, tick: float) -> None:
        self.local.advance(job, tick)  # each host keeps its own cursor

    def open_run(self, info: RunInfo) -> Claim | None:
        return None  # always claimed first

    def advance_and_open(self, job: str, tick: float, info: RunInfo) -> Claim:
        raise RuntimeError("a fleet run is claimed before it opens (may_refuse)")

    async def claim(self, info: RunInfo) -> Claim:
        # The tick as the database keeps it (whole µs), before anything uses it: a takeover
        # elsewhere gets it back from there, and both runs' ctx.scheduled must be the same.
        info.scheduled = round(info.scheduled * 1_000_000) / 1_000_000
        job, cause = info.job, info.cause
        if cause is Cause.TAKEOVER:
            granted = self.granted.pop((job, info.scheduled), None)
            if granted is None:
                raise NotClaimed(SkipReason.ELSEWHERE, "the takeover claim is gone")
            return self._hold(info, *granted)
        if self.db.state != "up":
            self._held_back(info)
            raise NotClaimed(SkipReason.FLEET_UNAVAILABLE, self.db.conn.last_error)
        cfg = self.jobs.get(job)
        skip = cfg is None or cfg.overlap == "skip"
        if skip and any(not h.lost for h in self.unwritten.get(job, {}).values()):
            # This host's own finish of the job is still queued, so its row is running
            # and the database can only answer "overlap": no round trip for that (a host
            # behind on its finishes would crowd them out with claims that must lose).
            raise NotClaimed(SkipReason.OVERLAP, "overlap: this host's finish is not written yet")
        for attempt in (1, 2):
            sent = boottime()
            try:
                if cause is Cause.MANUAL:
                    got = await self.db.claim_manual(job, str(cause), overlap_skip=skip)
                else:
                    window = (
                        cfg.grace if cfg is not None and cause is Cause.SCHEDULE
                        else self.cfg.claim_window
                    )  # fmt: skip
                    got = await self.db.claim(
                        job, info.scheduled, str(cause), window=window, overlap_skip=skip
                    )
            except FleetDown as exc:
                self._held_back(info)
                raise NotClaimed(SkipReason.FLEET_UNAVAILABLE, str(exc)) from None
            if got.fence is not None:
                claim = Claim(got.fence, self.node, got.lease_until or 0.0)
                return self._hold(info, claim, sent + self.lease - self.margin)
            if got.why == "early" and attempt == 1:
                # This host's clock is ahead of the database's: wait for the tick by the
                # database's clock (at most the early slack), then ask once more.
                await asyncio.sleep(max(0.0, min(info.scheduled - got.db_now, 1.0)) + 0.01)
                continue
            if got.why == "paused":
                asyncio.get_running_loop().call_soon(self._apply_flag, job, True, got.paused_at)
            why = got.why or "taken"
            raise NotClaimed(_REASONS.get(why, SkipReason.ELSEWHERE), why, got.holder)
        raise AssertionError("unreachable")  # pragma: no cover

    def finish(self, end: RunEnd) -> None:
        """The run ended: its fleet row is written by the writer task, and this host's
        history gets the run once the fleet's verdict is in (:meth:`recorded`): a result the
        fleet refused (the claim was taken over) is on record here as cancelled, since the
        tick ran, or runs, elsewhere."""
        fence = end.info.claim.fence
        held = None if fence is None else self.held.get(fence)
        if held is None:
            self.local.finish(end)
            return
        held.ended = True
        if held.lost:
            self.recorded(held, end, "the claim was lost before the run ended")
            return
        state = str(end.outcome)
        info = end.info
        if self.draining and end.outcome is Outcome.CANCELLED and self.cfg.on_owner_lost == "retry":
            # Cancelled by this daemon's stop, as if this node had died: another node's
            # sweep takes the tick over (not ended as cancelled, never to run).
            from taskd.fleet.loops import HAND_BACK

            why = f"{self.node} stopped during the run"
            self.queue(held, end, (HAND_BACK, 0, 0.0, why, None))
            return
        self.queue(held, end, (
            state if state in _STATES else "failed", info.attempt, end.duration,
            info.error, end.result_json,
        ))  # fmt: skip

    def queue(self, held: Held, end: RunEnd | None, values: tuple[Any, ...]) -> None:
        """Queue a finish for the writer (or a hand-back: its row stays running too)."""
        self.unwritten.setdefault(held.job, {})[held.fence] = held
        self.writes.put_nowait((held, end, values))

    def written(self, held: Held) -> None:
        """The writer is done with ``held``'s finish (kept, refused, or given up)."""
        mine = self.unwritten.get(held.job)
        if mine is not None:
            mine.pop(held.fence, None)
            if not mine:
                del self.unwritten[held.job]

    def recorded(
        self, held: Held, end: RunEnd | None, discarded: str | None, *, release: bool = True
    ) -> None:
        """The fleet's verdict on a finished run: kept (``discarded`` None) or not.
        ``release`` False: the claim stays held (heartbeating) though the run is over."""
        if release:
            self.release(held)
        if discarded is not None:
            log.warning("fleet_result_discarded", job=held.job, fence=held.fence,
                        run_id=held.run_id, why=discarded)  # fmt: skip
        if end is None:
            return
        if discarded is not None and end.outcome is not Outcome.CANCELLED:
            info = copy.copy(end.info)
            info.error = f"fenced out: {discarded}; the fleet does not count this run"
            end = dataclasses.replace(end, info=info, outcome=Outcome.CANCELLED, result_json=None)
        self.local.finish(end)

    def state_for(self, job: str, fence: int) -> SharedState:
        """``ctx.state`` of a fleet run: the fleet's state, written fenced by ``fence``."""
        from taskd.fleet.state import FleetState

        return FleetState(self.db, job, fence)

    def view(self, job: str) -> Mapping[str, Any] | None:
        """Status extras for ``job``: the fleet's running claim (owner, fence), if any."""
        for held in self.held.values():
            if held.job == job and not held.ended:
                return {"owner": self.node, "fence": held.fence, "tick": held.tick,
                        "node": self.node}  # fmt: skip
        row = self.running.get(job)
        return None if row is None else {**row, "node": self.node}

    def status(self) -> Mapping[str, Any]:
        # skew: how far this host's clock is ahead of the database's (negative: behind).
        return {"node": self.node, "db": self.db.state, "skew": round(-self.skew, 3),
                "claims_lost": self.claims_lost}  # fmt: skip

    # -- claims held -------------------------------------------------------------------------

    def _hold(self, info: RunInfo, claim: Claim, valid_until: float) -> Claim:
        assert claim.fence is not None
        # The host's own history gets the run too: its cause says claimed or taken over.
        self.local.open_run(info)
        self.held[claim.fence] = Held(
            info.job, claim.fence, info.scheduled, info.run_id, valid_until
        )
        self.arm_deadline()
        return claim

    def release(self, held: Held) -> None:
        self.held.pop(held.fence, None)

    def lose(self, held: Held, why: str) -> None:
        """The claim is no longer ours: cancel its run (its result would be refused)."""
        if held.lost:
            return
        held.lost = True
        self.claims_lost += 1
        log.warning("fleet_claim_lost", job=held.job, fence=held.fence, run_id=held.run_id,
                    why=why)  # fmt: skip
        if not held.ended and self.scheduler is not None:
            self.scheduler.cancel_run(held.job, held.run_id, f"claim lost: {why}")
        if held.ended:
            self.release(held)

    def arm_deadline(self) -> None:
        """One timer, at the earliest local deadline of the claims held, or in a second if
        that is later: the loop's timers count CLOCK_MONOTONIC, which stands still while the
        host is suspended, and a woken host must find a deadline passed in its sleep
        (CLOCK_BOOTTIME) within a second, not a timer's full delay later."""
        live = [h.valid_until for h in self.held.values() if not h.lost and not h.ended]
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if live:
            delay = min(max(0.0, min(live) - boottime()), DEADLINE_CHECK)
            self._deadline = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        now = boottime()
        for held in list(self.held.values()):
            if not held.lost and not held.ended and held.valid_until <= now:
                self.lose(held, f"fence {held.fence}: no heartbeat got through in time, "
                                "so the fleet may hand the tick to another host")  # fmt: skip
        self.arm_deadline()

    # -- the database down and back ----------------------------------------------------------

    def _held_back(self, info: RunInfo) -> None:
        if info.cause in (Cause.SCHEDULE, Cause.CATCHUP):
            first, last = self.held_from.get(info.job, (info.scheduled, info.scheduled))
            self.held_from[info.job] = (min(first, info.scheduled), max(last, info.scheduled))

    async def _back_up(self) -> None:
        """After a reconnect: the pause flags again (notices may have been lost), then each
        job held back catches up from its first skipped tick, under its ``catchup``."""
        try:
            if not self.ready:
                await self._prepare()  # the first connect failed at start
            elif self.jobs:
                await self.register(self.jobs.values())
        except (SchemaTooNew, NodeTaken) as exc:
            self._refuse(exc)
            return
        held, self.held_from = self.held_from, {}
        if self.scheduler is not None:
            for job, (first, last) in held.items():
                self.scheduler.catch_up(job, first, last)
