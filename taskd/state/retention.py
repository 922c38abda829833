"""How much run history the state database keeps: the newest ``max_runs`` runs (by when
they started), and, with ``max_age``, none that started longer ago than that.

Counted in rows, not in AUTOINCREMENT numbers: SQLite spends one of those on every upsert,
so a run (a row when it starts, updated when it ends) used two, and "the newest 100,000"
by number kept about 50,000 runs.

Deleting is bounded, so that commits are not held up behind it: a commit deletes at most as many
rows as it added (at steady state exactly those, so the limits hold after every commit),
and a larger excess (a lowered ``history_max_runs``, a new ``history_max_age``, a file from
a daemon with other limits) goes in passes of about PASS_SECONDS each, between which the
state writer commits the runs' rows (:class:`Backlog`). Deleting a million rows at once held
the database for 1.5 s."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("taskd.state")

HISTORY_MAX_RUNS = 100_000
# Time spent deleting in one pass over a backlog. Measured on a 2-core machine (bench/
# retention.py): ~1,600 rows a pass with small results, ~580 with 8 KB ones; a pass holds the
# state writer 2.3 ms (median) with its commit, more (10-40 ms) when that commit is the one that
# pays SQLite's WAL checkpoint, as any commit can.
PASS_SECONDS = 0.002
FIRST_CHUNK = 64  # rows deleted first in a pass, before the time per row is known
# Between two passes: a backlog takes about a fifth of the writer's time, and a million small
# rows go in about 10 s (100,000 with 8 KB results in 2.5 s).
PASS_PAUSE = 0.01


@dataclass(frozen=True, slots=True)
class Pruned:
    count: int  # rows left in the runs table
    more: bool  # rows past the limits may be left: another pass is due


@dataclass(frozen=True, slots=True)
class Retention:
    max_runs: int = HISTORY_MAX_RUNS
    max_age: float | None = None  # seconds; None: no age limit

    def prune(self, db: sqlite3.Connection, count: int, now: float, rows: int) -> Pruned:
        """Delete at most ``rows`` rows past the limits, inside the caller's transaction,
        given that the runs table holds ``count`` rows: those that started before
        ``now - max_age`` first, then the oldest past ``max_runs``. Cheap when nothing is
        due: an index lookup on ``started`` and an integer comparison."""
        deleted = 0
        more = False
        if self.max_age is not None and rows > 0:
            # A run still going keeps its row, however long it takes: it ends into it.
            deleted = db.execute(
                "DELETE FROM runs WHERE seq IN (SELECT seq FROM runs "
                "WHERE started < ? AND outcome != 'running' ORDER BY started LIMIT ?)",
                (now - self.max_age, rows),
            ).rowcount
            more = deleted == rows
        excess = count - deleted - self.max_runs
        if excess > 0 and deleted < rows:
            deleted += db.execute(
                "DELETE FROM runs WHERE seq IN (SELECT seq FROM runs ORDER BY seq LIMIT ?)",
                (min(excess, rows - deleted),),
            ).rowcount
        count -= deleted
        return Pruned(count, more or count > self.max_runs)

    def prune_for(
        self, db: sqlite3.Connection, count: int, now: float, seconds: float = PASS_SECONDS
    ) -> Pruned:
        """Delete past the limits for about ``seconds``, inside the caller's transaction:
        in chunks, each sized from the time a row has taken so far (8 KB results cost
        about 16 times what small ones do), so a pass ends near its time whatever the
        rows hold."""
        clock = time.perf_counter
        start = clock()
        chunk = FIRST_CHUNK
        total = 0
        while True:
            done = self.prune(db, count, now, chunk)
            total += count - done.count
            count = done.count
            spent = clock() - start
            if not done.more or spent >= seconds:
                return done
            # Four times the last chunk at most: one slow chunk must not size a huge next.
            fits = int((seconds - spent) * total / spent) if total and spent > 0 else chunk
            chunk = max(FIRST_CHUNK, min(4 * chunk, fits))


class Backlog:
    """Rows past the limits that commits have not deleted (a commit deletes no more than it
    added, and nothing by age when it added nothing): passes, PASS_PAUSE apart on the state
    writer's thread (taskd.state.writer), delete them. ``run_pass`` runs one pass in its own
    transaction and returns the rows before it and what it did; ``failed`` is told when one
    fails (the writer tries again after its next good commit)."""

    def __init__(
        self,
        run_pass: Callable[[], tuple[int, Pruned]],
        failed: Callable[[Exception], None],
    ) -> None:
        self._run_pass = run_pass
        self._failed = failed
        self.due = False  # rows past the limits may be left
        self._passes = 0  # passes over this backlog so far
        self._since = 0.0  # time.monotonic() of its first pass
        self._deleted = 0

    def note(self, done: Pruned) -> None:
        """A commit pruned. Only a pass says the backlog is gone: a commit's deletes are
        bounded by what it added, so one that left nothing may just have looked at less."""
        if done.more:
            self.due = True

    def begin(self) -> None:
        """At start: one pass now (READY must not wait for more); the writer does the rest."""
        self.due = True
        self.step()

    def try_step(self) -> bool:
        """One pass now, a failure reported; whether it worked."""
        try:
            self.step()
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            return False
        return True

    def step(self) -> None:
        """One pass now."""
        if self._passes == 0:
            self._since = time.monotonic()
        self._passes += 1
        before, done = self._run_pass()
        self._deleted += before - done.count
        if done.more:
            self.due = True
            if self._passes == 2:
                log.info(
                    "history_pruning",
                    runs=done.count,
                    hint="runs past history_max_runs/history_max_age are deleted a few ms "
                    "at a time, between the state writer's commits",
                )
            return
        if self._passes > 1:
            # Only a real backlog is worth a line: a single pass that finds what one commit
            # left (after most commits at steady state with history_max_age) is not.
            log.info(
                "history_pruned",
                deleted=self._deleted,
                runs=done.count,
                passes=self._passes,
                took=round(time.monotonic() - self._since, 3),
            )
        self.due = False
        self._passes = self._deleted = 0


def count_runs(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
