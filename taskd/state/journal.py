"""The tick journal: what must be on record before a run starts, at the cost of one write(2).

Before a job runs, the tick it runs for must be recorded, or a crash could make the restarted
daemon run that tick again. A SQLite commit per run start costs tens of microseconds and a
loop iteration; a burst of 10,000 runs due at once would wait for it. So each handled tick and
each run start is appended here with one ``os.write`` (no fsync: once write(2) returns the
kernel has the bytes, and a ``kill -9`` cannot lose them; only a power cut can, as with
SQLite's ``synchronous=NORMAL``). The store replays the journal into SQLite when it opens and
empties it after every commit, so it never holds more than one loop iteration's worth.

Hand-written because no library offers an append-only, replayable record this small; the
format is one tab-separated line per entry:

    T <job> <tick>                          a tick handled (run or skipped)
    R <run_id> <job> <scheduled> <started> <trigger>   a run started
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("taskd.state")


@dataclass(slots=True)
class Replay:
    """What a journal held: the latest tick per job, and the runs it saw start."""

    ticks: dict[str, float] = field(default_factory=dict)
    runs: list[tuple[str, str, float, float, str]] = field(default_factory=list)
    bad_lines: int = 0


class TickJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.errors = 0
        self._last_error_log = float("-inf")
        self._torn = False

    def open(self) -> Replay:
        """Open for appending and return what an earlier process left in it."""
        replay = Replay()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        for raw in data.split(b"\n"):
            if not raw:
                continue
            parts = raw.decode("utf-8", "replace").split("\t")
            try:
                if parts[0] == "T" and len(parts) == 3:
                    tick = float(parts[2])
                    if tick > replay.ticks.get(parts[1], float("-inf")):
                        replay.ticks[parts[1]] = tick
                elif parts[0] == "R" and len(parts) == 6:
                    replay.runs.append(
                        (parts[1], parts[2], float(parts[3]), float(parts[4]), parts[5])
                    )
                else:
                    raise ValueError(raw)
            except ValueError:
                # Only a power cut can leave a torn last line; anything else is not ours.
                replay.bad_lines += 1
        if replay.bad_lines:
            log.warning("journal_lines_skipped", path=str(self.path), count=replay.bad_lines)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return replay

    def tick(self, job: str, tick: float) -> None:
        self._write(f"T\t{job}\t{tick!r}\n")

    def run_started(
        self, run_id: str, job: str, scheduled: float, started: float, trigger: str
    ) -> None:
        self._write(f"R\t{run_id}\t{job}\t{scheduled!r}\t{started!r}\t{trigger}\n")

    def _write(self, line: str) -> None:
        if self._fd is None:
            return
        # Job names are [A-Za-z0-9_.-] (checked by the config), so no tab or newline.
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
