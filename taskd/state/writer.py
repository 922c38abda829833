"""The state writer: one thread that owns the SQLite connection once the store is open.

The event loop must never wait for a disk. Done on the loop, a commit per spread-out run
(~120 µs of CPU) and SQLite's auto-checkpoints (an ``fdatasync``, 3-27 ms, ~14 a second at
1,000 runs/s) were most of the CPU per run and all of the p99 lateness. So the loop appends
row operations to a deque (atomic under the GIL; the first after a quiet spell sets an Event)
and this thread folds them into one transaction per group: each op commits as it comes while
fewer than BUSY_OPS come a second; above that at most one commit per GROUP_SECONDS, held
while a burst is still being queued (see _await_group); at once when GROUP_OPS wait or when
someone waits (``flush``, ``durable``, a read, the stop). It checkpoints on its own schedule
(auto-checkpoint is off on this connection), prunes the history (taskd.state.retention) and
empties the journal's files once what they hold is committed (taskd.state.ticklog).

Reads go through the same queue (:meth:`Writer.call`): they see every write queued before
them. A failing commit (disk full, read-only, I/O error) keeps the rows in memory and is tried
again RETRY_SECONDS later, logged each time, as the loop did before; runs go on."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from taskd.errors import StateNotSaved
from taskd.state.dbfile import describe, is_io_error, rollback
from taskd.state.reads import Call, closed
from taskd.state.retention import Backlog, Pruned, Retention
from taskd.state.ticklog import TickLog
from taskd.state.writes import Pending

log = structlog.get_logger("taskd.state")

# Measured with bench/spread.py (1,000 jobs a second, spread and in a burst): see the README.
GROUP_SECONDS = 0.05
GROUP_OPS = 50_000  # a 10,000-run burst queues 30,000: one commit after it, not three in it
BUSY_OPS = 200  # ops a second (a tick, a run start, a run end each) from which to group
# A burst in progress: QUIET_OPS or more ops queued in QUIET_SECONDS (8,000 a second; a steady
# 1,000 runs a second queues about 6).
QUIET_SECONDS = 0.002
QUIET_OPS = 16
QUIET_LATE = 0.001  # woken this much later than asked: the loop held the GIL, it is busy
QUIET_MAX = 1.0  # how long a group may wait for a burst to end (10,000 runs: ~0.7 s)
CHECKPOINT_SECONDS = 1.0  # a PASSIVE checkpoint at most this often, after commits
RETRY_SECONDS = 1.0  # after a failed commit
MAX_BUFFERED_RUNS = 100_000  # history rows kept in memory while the database is failing
PASS_BUDGET = 0.01  # retention passes per cycle: about a fifth of a group's time
_YIELD_EVERY = 512  # ops folded between two offers of the GIL to the loop thread

# Operations: a tuple whose first item says what it is.
TICK, PAUSED, RUN, FINISHED, SHARED, RETENTION, CALL = range(7)


class Writer:
    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        journal: TickLog,
        retention: Retention,
        run_count: int,
        on_cycle: Callable[[], None],
    ) -> None:
        self.db = db
        self.path = path
        self.journal = journal
        self.retention = retention
        self.run_count = run_count  # rows in the runs table, as of the last commit
        self.backlog = Backlog(self._prune_pass, self._prune_failed)
        self._on_cycle = on_cycle  # after each commit attempt (the store releases waiters)
        self.queue: deque[tuple[Any, ...]] = deque()
        self.pending = Pending()
        # Runs committed as running and not yet ended: their end updates the row.
        self._open_runs: set[str] = set()
        self.submitted = 0  # ops queued (loop thread)
        self._drained = 0  # ops taken off the queue (writer thread)
        self.committed = 0  # ops taken off the queue and committed
        self._wake = threading.Event()  # ops are waiting
        self._hurry = threading.Event()  # commit them now
        self._closing = False
        self.failing = False
        self.write_errors = 0
        self._io_failed = False  # the disk failed a read or write since the file was opened
        self._last_error: BaseException | None = None
        self._retry_at = 0.0
        self._last_commit = 0.0  # time.monotonic() of the last commit
        self._recent = 0.0  # ops drained lately (decaying, see _busy)
        self._recent_at = time.monotonic()
        self._commits_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpoint_error: str | None = None
        self.close_error: BaseException | None = None
        self._close_wait = 0.0
        self._thread = threading.Thread(target=self._main, name="taskd-state-writer", daemon=True)

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # this thread checkpoints
        self._thread.start()

    def submit(self, op: tuple[Any, ...]) -> None:
        self.queue.append(op)
        self.submitted += 1
        if not self._wake.is_set():
            self._wake.set()
        if len(self.queue) >= GROUP_OPS and not self._hurry.is_set():
            self._hurry.set()

    def hurry(self) -> None:
        self._hurry.set()
        self._wake.set()

    def call(self, fn: Callable[[Writer], Any], *, strict: bool = False) -> Any:
        """Run ``fn(writer)`` on the writer thread once everything queued before is
        committed, and return what it returns (blocking the caller until then)."""
        if not self._thread.is_alive():
            raise closed()
        call = Call(fn, strict)
        self.submit((CALL, call))
        self.hurry()
        while not call.done.wait(1.0):
            if not self._thread.is_alive():  # it died of a bug (logged): do not hang here
                raise closed()
        if call.error is not None:
            raise call.error
        return call.result

    def close(self, wait: float = 0.0) -> None:
        """Commit everything queued, checkpoint, close the connection. A final commit the
        disk refuses is tried again every RETRY_SECONDS for up to ``wait`` seconds (room
        may be made meanwhile); if it still fails, StateNotSaved is raised, with what is
        lost (the journal keeps what it holds)."""
        self._close_wait = wait
        self._closing = True
        self.hurry()
        self._thread.join()
        if self.close_error is not None:
            raise self.close_error

    # -- the writer thread -----------------------------------------------------------------

    def _main(self) -> None:
        while not self._closing:
            self._wake.wait(self._idle_timeout())
            if self.queue and not self._hurry.is_set() and self._busy():
                self._await_group()
            self._hurry.clear()
            self._cycle()
            if not self._closing:
                self._housekeeping()
        self._final()

    def _await_group(self) -> None:
        """At most one commit per GROUP_SECONDS: rows that come meanwhile go into the next.
        Then, while the loop is still adding rows fast (a burst of runs being started), wait
        for it to finish, up to QUIET_MAX more: this thread's work takes the GIL from the loop
        in 5 ms turns (sys.getswitchinterval), and a burst's runs started later for it."""
        hurry = self._hurry
        wait = self._last_commit + GROUP_SECONDS - time.monotonic()
        if wait > 0 and hurry.wait(wait):
            return
        until = time.monotonic() + QUIET_MAX
        seen = len(self.queue)
        while True:
            asked = time.monotonic()
            if hurry.wait(QUIET_SECONDS):
                return
            # Back from the wait only once the loop lets go of the GIL: woken late, the loop
            # is busy, whatever it queued meanwhile (a burst has phases that queue nothing).
            now = time.monotonic()
            late = now - asked - QUIET_SECONDS > QUIET_LATE
            n = len(self.queue)
            if (n - seen < QUIET_OPS and not late) or now >= until:
                return
            seen = n

    def _busy(self) -> bool:
        """Whether rows come fast enough to be worth grouping: about BUSY_OPS in the last
        second. A sparse load commits each row as it comes, as the loop did before, so a
        run is on record (and in `taskd history`) as soon as its end is logged."""
        now = time.monotonic()
        recent = self._recent * math.exp(self._recent_at - now) + len(self.queue)
        return recent >= BUSY_OPS

    def _count(self, n: int) -> None:
        """``n`` ops drained now: the decaying count (time constant 1 s) _busy reads."""
        now = time.monotonic()
        self._recent = self._recent * math.exp(self._recent_at - now) + n
        self._recent_at = now

    def _idle_timeout(self) -> float | None:
        if self.failing:
            return max(0.0, self._retry_at - time.monotonic())
        if self.backlog.due:
            return 0.01
        if self._commits_since_checkpoint:
            return max(0.0, self._last_checkpoint + CHECKPOINT_SECONDS - time.monotonic())
        return None

    def _cycle(self, *, force: bool = False) -> None:
        self._wake.clear()  # before draining: an op queued after the drain sets it again
        self.journal.cut()
        queue, n = self.queue, 0
        # The three ops of every run inline (a burst folds 30,000 of them), the rest below.
        runs, ticks, job_last = self.pending.runs, self.pending.ticks, self.pending.job_last
        while queue:
            op = queue.popleft()
            n += 1
            kind = op[0]
            if kind == RUN:
                runs[op[1]] = op[2]
            elif kind == TICK:
                ticks[op[1]] = op[2]
            elif kind == FINISHED:
                runs[op[1]] = op[2]
                job_last[op[3]] = op[4]
            elif kind == CALL:
                self._drained += n
                n = 0
                self._commit(force=op[1].strict)
                self._answer(op[1])
                # A failing commit may have replaced the runs dict (history_dropped).
                runs = self.pending.runs
                continue
            else:
                self._fold(op)
            if n % _YIELD_EVERY == 0:
                time.sleep(0)  # a burst's fold must not hold the GIL from the loop thread
        self._drained += n
        self._count(n)
        self._commit(force=force)

    def _fold(self, op: tuple[Any, ...]) -> None:
        kind, p = op[0], self.pending
        if kind == TICK:
            p.ticks[op[1]] = op[2]
        elif kind == RUN:
            p.runs[op[1]] = op[2]
        elif kind == FINISHED:
            p.runs[op[1]] = op[2]
            p.job_last[op[3]] = op[4]
        elif kind == PAUSED:
            p.paused[op[1]] = op[2]
        elif kind == SHARED:
            p.shared[op[1]] = op[2]
        elif kind == RETENTION:
            self.retention = op[1]
            self.backlog.due = True

    def _answer(self, call: Call) -> None:
        try:
            if call.strict and self.failing and self._last_error is not None:
                raise self._last_error
            call.result = call.fn(self)
        except BaseException as exc:  # handed to the caller, on its thread
            call.error = exc
        finally:
            call.done.set()

    def _commit(self, *, force: bool = False) -> None:
        """Commit what is folded; while failing, only once the retry is due (or ``force``)."""
        if self.failing and not force and time.monotonic() < self._retry_at:
            return
        if self.pending:
            try:
                self._write_pending()
            except Exception as exc:
                # Not only the disk's errors: one this thread does not expect must not kill
                # it (every later read would wait for it), and the rows stay kept.
                self._failed(exc)
                self._on_cycle()
                return
            self._commits_since_checkpoint += 1
            self._last_commit = time.monotonic()
            if self.failing:
                log.warning("state_write_recovered", path=str(self.path))
                self.failing = False
        self.committed = self._drained
        self.journal.committed()
        self._on_cycle()

    def _write_pending(self) -> None:
        db = self.db
        db.execute("BEGIN")
        try:
            added = self.pending.write(db, self._open_runs)
            # As many as were added, at most: exact at steady state, and a commit never
            # costs more than its own writes did; a backlog goes in passes.
            done = self.retention.prune(db, self.run_count + added, time.time(), added)
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        self.run_count = done.count
        self.backlog.note(done)
        open_runs = self._open_runs
        for run_id, row in self.pending.runs.items():
            if row[6] == "running":
                open_runs.add(run_id)
            else:
                open_runs.discard(run_id)
        self.pending.clear()

    def _failed(self, exc: Exception) -> None:
        self._io_failed = self._io_failed or is_io_error(exc)
        self._last_error = exc
        self.write_errors += 1
        self.failing = True
        self._retry_at = time.monotonic() + RETRY_SECONDS
        # Keep the rows and try again shortly. Runs go on regardless: a full disk must not
        # stop every job, and the error is loud.
        log.error(
            "state_write_failed",
            path=str(self.path),
            error=self._describe(exc),
            retry_in="1s",
            hint="runs continue; state and history are kept in memory until the write succeeds",
        )
        if len(self.pending.runs) > MAX_BUFFERED_RUNS:
            # Memory is not a place to keep history forever while the disk is failing.
            rows = list(self.pending.runs.items())
            drop = len(rows) - MAX_BUFFERED_RUNS // 2
            self.pending.runs = dict(rows[drop:])
            log.error("history_dropped", runs=drop, reason="state writes keep failing")

    def _housekeeping(self) -> None:
        if self.failing:
            return
        if self.backlog.due:
            until = time.monotonic() + PASS_BUDGET
            while self.backlog.due and not self._hurry.is_set() and time.monotonic() < until:
                if not self.backlog.try_step():
                    break
        now = time.monotonic()
        if self._commits_since_checkpoint and now - self._last_checkpoint >= CHECKPOINT_SECONDS:
            self._checkpoint("PASSIVE")

    def _checkpoint(self, mode: str) -> bool:
        self._last_checkpoint = time.monotonic()
        try:
            self.db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.Error as exc:
            error = self._describe(exc)
            if error != self._checkpoint_error:  # once per kind, not once a second
                self._checkpoint_error = error
                log.warning(
                    "state_checkpoint_failed",
                    path=str(self.path),
                    error=error,
                    hint="commits go on into the -wal file; the checkpoint is tried again",
                )
            return False
        self._checkpoint_error = None
        self._commits_since_checkpoint = 0
        return True

    def _prune_pass(self) -> tuple[int, Pruned]:
        """One bounded pass over rows past the limits, in its own transaction."""
        db = self.db
        if self.failing:
            # The retried commit prunes once writes work again.
            raise sqlite3.OperationalError("state writes are failing")
        db.execute("BEGIN")
        try:
            done = self.retention.prune_for(db, self.run_count, time.time())
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        self._commits_since_checkpoint += 1
        before, self.run_count = self.run_count, done.count
        return before, done

    def _prune_failed(self, exc: Exception) -> None:
        if self.failing:
            return  # said every second already
        log.warning(
            "history_prune_failed",
            path=str(self.path),
            error=self._describe(exc),
            retry="after the next commit",
        )

    def _wait_for_disk(self) -> None:
        """At the stop, the disk refusing the last commit: what is only in memory (runs
        since the disk filled) would be lost, so wait for room, bounded by the stop's time."""
        p = self.pending
        log.error(
            "state_close_waiting",
            path=str(self.path),
            error=self._describe(self._last_error),
            runs=len(p.runs),
            wait=round(self._close_wait, 1),
            hint="free space on the filesystem holding state_dir: what is held in memory is "
            "written as soon as a commit succeeds, and the stop then ends",
        )
        until = time.monotonic() + self._close_wait
        while self.failing and (left := until - time.monotonic()) > 0:
            time.sleep(min(RETRY_SECONDS, left))
            self._commit(force=True)

    def _describe(self, exc: BaseException | None) -> str:
        """What a failure of this file means, in an operator's words (dbfile.describe)."""
        if exc is None:
            return "state writes failed"
        return describe(exc, where=self.path.parent, after_io_error=self._io_failed)

    def _final(self) -> None:
        """At the stop: everything queued committed, the -wal emptied into the file."""
        try:
            self._cycle(force=True)
            if self.failing:
                self._wait_for_disk()
            if self.failing:
                p = self.pending
                self.close_error = StateNotSaved(
                    self._describe(self._last_error),
                    runs=len(p.runs),
                    ticks=len(p.ticks),
                    other=len(p.paused) + len(p.shared) + len(p.job_last),
                )
            else:
                # What is left of a backlog goes after the next start: a stop must not wait.
                self._checkpoint("TRUNCATE")
                self.journal.reset_all()
        finally:
            try:
                self.db.close()
            finally:
                while self.queue:  # a read that raced the stop: answered, not left hanging
                    op = self.queue.popleft()
                    if op[0] == CALL:
                        op[1].error = closed()
                        op[1].done.set()
