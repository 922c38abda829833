"""The tick journal: what must be on record before a run starts, at the cost of one write(2).

Before a job runs, the tick it runs for must be recorded, or a crash could make the restarted
daemon run that tick again. A SQLite commit per run start costs tens of microseconds and a
loop iteration; a burst of 10,000 runs due at once would wait for it. So each handled tick and
each run start is appended here with one ``os.write`` (no fsync: once write(2) returns the
kernel has the bytes, and a ``kill -9`` cannot lose them; only a power cut can, as with
SQLite's ``synchronous=NORMAL``). The store replays the journal into SQLite when it opens;
while it runs, two journal files take turns (``ticklog.py``): each is emptied once the
writer's commit that holds its lines has succeeded, so together they hold what came since
about the last commit.

Hand-written because no library offers an append-only, replayable record this small; the
format is one tab-separated line per entry:

    T <job> <tick>                          a tick handled (run or skipped)
    R <run_id> <job> <scheduled> <started> <trigger>   a run started
    P <job> <0|1> <time>                    the job resumed (0) or paused (1) at <time>
    E <run_id> <job> <scheduled> <started> ...          a run ended (taskd.state.endline)

Whatever is read back is checked before use (see ``time_problem``): a line that is not one of
these, or names no valid job, is skipped with a warning; a time out of range is logged as
``state_value_invalid`` and ignored. The rest of the journal replays regardless.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from taskd.config.job_table import JOB_NAME
from taskd.errors import StateError
from taskd.run.events import Cause
from taskd.state import files
from taskd.state.endline import FIELDS as END_FIELDS
from taskd.state.endline import End, parse_end

log = structlog.get_logger("taskd.state")

# A stored time (tick, cursor, run start) is taken only within [0, now + MAX_AHEAD]. Every
# one was "now" or earlier when written; later than now means the clock went back (the
# scheduler waits for it to catch up), but ten years later is a corrupt value, and so is
# anything not finite or before 1970. Out of range, a value would crash the scheduler (inf,
# 1e12: no datetime that far) or have it step a trigger for ever (-1e308).
MAX_AHEAD = 10 * 365.25 * 86400.0
RUN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_TRIGGERS = frozenset(c.value for c in Cause)
# Per replay, lines and values reported one by one; the rest are only counted.
MAX_REPORTED = 20
# Replay reads the journal in chunks, so its memory is bounded by the jobs (one tick each)
# and the run starts kept, not by the file: it grows without bound only while the database
# keeps failing. A run start replayed only marks that run "interrupted" in the history; past
# this many, the oldest are dropped (counted and logged). The same bound as the store's
# buffer of history rows while writes fail.
MAX_REPLAY_RUNS = 100_000
MAX_LINE_BYTES = 4096  # taskd writes under 3 KiB (an E line at its longest, taskd.state.endline)
_READ_CHUNK = 1024 * 1024


def time_problem(value: object, now: float) -> str | None:
    """Why ``value`` cannot be a stored point in time (unix seconds), or None if it can."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"not a number but {type(value).__name__}"
    if not math.isfinite(value):
        return "not a finite number"
    if value < 0:
        return "before 1970 (negative)"
    if value > now + MAX_AHEAD:
        return "more than 10 years ahead of the clock"
    return None


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


@dataclass(slots=True)
class Replay:
    """What a journal held: the latest tick per job, and the runs it saw start."""

    ticks: dict[str, float] = field(default_factory=dict)
    # job -> (time, paused): the newest pause or resume of each job.
    paused: dict[str, tuple[float, bool]] = field(default_factory=dict)
    # The newest MAX_REPLAY_RUNS run starts; older ones are counted in runs_dropped.
    runs: list[tuple[str, str, float, float, str]] = field(default_factory=list)
    # run_id -> how it ended: the newest MAX_REPLAY_RUNS run ends, older ones counted too.
    ends: dict[str, End] = field(default_factory=dict)
    bad_lines: int = 0  # lines skipped: malformed, or holding a value out of range
    runs_dropped: int = 0

    def trim(self) -> None:
        drop = len(self.runs) - MAX_REPLAY_RUNS
        if drop > 0:
            del self.runs[:drop]
            self.runs_dropped += drop
        drop = len(self.ends) - MAX_REPLAY_RUNS
        if drop > 0:  # the oldest first: a dict keeps the order its keys came in
            for run_id in list(self.ends)[:drop]:
                del self.ends[run_id]
            self.runs_dropped += drop


class TickJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.errors = 0
        self._last_error_log = float("-inf")
        self._torn = False

    def open(self) -> Replay:
        """Open for appending and return what an earlier process left in it.

        Opened without following a symlink (taskd.state.files), and read through that same
        descriptor a chunk at a time: memory stays bounded whatever the journal's size (it
        holds one loop iteration's worth normally, but grows while the database is failing)."""
        replay = Replay()
        fd = files.open_file(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            now = time.time()
            lineno = 0
            offset = 0
            rest = b""
            skipping = False  # inside a line too long to be ours, until its newline
            while True:
                chunk = os.pread(fd, _READ_CHUNK, offset)
                if not chunk:
                    break
                offset += len(chunk)
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for raw in lines:
                    lineno += 1
                    if skipping:
                        skipping = False
                    elif raw:
                        self._replay_line(replay, raw, f"{self.path}:{lineno}", now)
                if len(rest) > MAX_LINE_BYTES and not skipping:
                    replay.bad_lines += 1
                    skipping = True
                if skipping:
                    rest = b""
            if rest and not skipping:
                self._replay_line(replay, rest, f"{self.path}:{lineno + 1}", now)
        except OSError as exc:
            os.close(fd)
            raise StateError(f"cannot read the tick journal {self.path}: {exc}") from exc
        replay.trim()
        if replay.bad_lines:
            log.warning("journal_lines_skipped", path=str(self.path), count=replay.bad_lines)
        if replay.runs_dropped:
            log.warning(
                "journal_runs_dropped",
                path=str(self.path),
                count=replay.runs_dropped,
                kept=MAX_REPLAY_RUNS,
                hint="the oldest run starts in the journal are not added to the history",
            )
        self._fd = fd
        return replay

    @staticmethod
    def _replay_line(replay: Replay, raw: bytes, where: str, now: float) -> None:
        """Fold one line into ``replay``, or count it as skipped and say why."""
        try:
            entry = _parse(raw.decode("utf-8", "replace"), now)
        except _Unusable as exc:
            replay.bad_lines += 1
            if replay.bad_lines <= MAX_REPORTED:  # a journal of garbage: not a log line for each
                log.warning(exc.event, source=f"tick journal {where}", **exc.fields)
            return
        if isinstance(entry, _Tick):
            if entry.tick > replay.ticks.get(entry.job, -1.0):
                replay.ticks[entry.job] = entry.tick
        elif isinstance(entry, _Pause):
            if entry.at >= replay.paused.get(entry.job, (-1.0, False))[0]:
                replay.paused[entry.job] = (entry.at, entry.paused)
        elif isinstance(entry, End):
            replay.ends.pop(entry.run_id, None)  # moved to the end: the newest
            replay.ends[entry.run_id] = entry
            if len(replay.ends) >= 2 * MAX_REPLAY_RUNS:
                replay.trim()
        else:
            replay.runs.append(entry)
            if len(replay.runs) >= 2 * MAX_REPLAY_RUNS:  # trimmed in bulk: amortised O(1)
                replay.trim()

    def tick(self, job: str, tick: float) -> None:
        _check_name(job)
        self._write(f"T\t{job}\t{tick!r}\n")

    def run_started(
        self, run_id: str, job: str, scheduled: float, started: float, trigger: str
    ) -> None:
        _check_name(job)
        self._write(f"R\t{run_id}\t{job}\t{scheduled!r}\t{started!r}\t{trigger}\n")

    def write(self, line: str) -> None:
        """Append ``line`` (one or more whole lines) with one write(2)."""
        self._write(line)

    def _write(self, line: str) -> None:
        if self._fd is None:
            return
        # Job names are [A-Za-z0-9_.-] (the config checks them, _check_name again), so no tab
        # or newline.
        # After a failed write a torn line may end the file: start on a fresh line so this
        # entry is not glued to it (replay skips the torn one, not both).
        data = ("\n" + line if self._torn else line).encode()
        try:
            while data:  # a short write (disk filling up) must not leave a torn line
                data = data[os.write(self._fd, data) :]
            self._torn = False
        except OSError as exc:
            self._torn = True
            # The run goes on regardless: a full disk must not stop every job (nor the one
            # that would clean it up). The price: a crash now could repeat this tick.
            self.errors += 1
            now = time.monotonic()
            if now - self._last_error_log >= 1.0:
                self._last_error_log = now
                log.error(
                    "journal_write_failed",
                    path=str(self.path),
                    error=str(exc),
                    failures=self.errors,
                    hint="runs continue; a crash before the disk recovers could repeat a tick",
                )

    def reset(self) -> None:
        """Everything written so far is committed to the database: start empty."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError as exc:  # it only grows; replay is idempotent
                log.error("journal_reset_failed", path=str(self.path), error=str(exc))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class _Tick:
    job: str
    tick: float


@dataclass(frozen=True, slots=True)
class _Pause:
    job: str
    paused: bool
    at: float


class _Unusable(ValueError):
    """A journal line that is not used: ``event`` and ``fields`` say why, for the log."""

    def __init__(self, event: str, **fields: str) -> None:
        super().__init__(event)
        self.event = event
        self.fields = fields


def _parse(text: str, now: float) -> _Tick | _Pause | End | tuple[str, str, float, float, str]:
    """One journal line: a tick, a pause or resume, a run's end, or a run start as the
    store's history row wants it."""
    parts = text.split("\t")
    if (parts[0], len(parts)) not in (("T", 3), ("R", 6), ("P", 4), ("E", END_FIELDS)):
        # Only a power cut can leave a torn last line; anything else is not ours.
        raise _Unusable(
            "journal_line_skipped", line=_clip(text), problem="not a T, R, P or E entry"
        )
    job = parts[2] if parts[0] in ("R", "E") else parts[1]
    if not JOB_NAME.fullmatch(job):
        # The config refuses such a name, so no job of ours wrote it.
        raise _Unusable("journal_line_skipped", line=_clip(text), problem="invalid job name")
    trigger = parts[5] if parts[0] == "R" else parts[8] if parts[0] == "E" else ""
    if parts[0] in ("R", "E") and not (RUN_ID.fullmatch(parts[1]) and trigger in _TRIGGERS):
        raise _Unusable(
            "journal_line_skipped", line=_clip(text), problem="invalid run id or trigger"
        )
    if parts[0] == "P" and parts[2] not in ("0", "1"):
        raise _Unusable("journal_line_skipped", line=_clip(text), problem="pause flag not 0 or 1")
    fields = (
        {"tick": parts[2]}
        if parts[0] == "T"
        else {"at": parts[3]}
        if parts[0] == "P"
        else {"scheduled": parts[3], "started": parts[4]}
    )
    times: list[float] = []
    for name, value_text in fields.items():
        try:
            value = float(value_text)
        except ValueError:
            raise _Unusable(
                "journal_line_skipped", line=_clip(text), problem=f"{name} is not a number"
            ) from None
        problem = time_problem(value, now)
        if problem is not None:
            raise _Unusable(
                "state_value_invalid",
                job=job,
                field=name,
                value=_clip(value_text),
                problem=problem,
                action="line ignored",
            )
        times.append(value)
    if parts[0] == "T":
        return _Tick(job, times[0])
    if parts[0] == "P":
        return _Pause(job, parts[2] == "1", times[0])
    if parts[0] == "E":
        end, problem = parse_end(parts)
        if end is None:
            raise _Unusable("journal_line_skipped", line=_clip(text), problem=problem)
        return end
    return (parts[1], job, times[0], times[1], parts[5])


def _check_name(job: str) -> None:
    # The config checks every name; this is the last line of defence: a name with a tab or a
    # newline would tear the journal, and after a crash a tick could run twice.
    if not JOB_NAME.fullmatch(job):
        raise ValueError(f"job name {job!r} is not valid; it must not reach the tick journal")
