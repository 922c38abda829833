"""How much run history the state database keeps: the newest ``max_runs`` runs (by when
they started), and, with ``max_age``, none that started longer ago than that.

Counted in rows, not in AUTOINCREMENT numbers: SQLite spends one of those on every upsert,
so a run (a row when it starts, updated when it ends) used two, and "the newest 100,000"
by number kept about 50,000 runs."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

HISTORY_MAX_RUNS = 100_000


@dataclass(frozen=True, slots=True)
class Retention:
    max_runs: int = HISTORY_MAX_RUNS
    max_age: float | None = None  # seconds; None: no age limit

    def prune(self, db: sqlite3.Connection, count: int, now: float) -> int:
        """Delete what is past the limits inside the caller's transaction, given that the
        runs table holds ``count`` rows; the rows left. Cheap when nothing is due: an index
        lookup on ``started`` and an integer comparison."""
        if self.max_age is not None:
            # A run still going keeps its row, however long it takes: it ends into it.
            count -= db.execute(
                "DELETE FROM runs WHERE started < ? AND outcome != 'running'",
                (now - self.max_age,),
            ).rowcount
        excess = count - self.max_runs
        if excess > 0:
            count -= db.execute(
                "DELETE FROM runs WHERE seq IN (SELECT seq FROM runs ORDER BY seq LIMIT ?)",
                (excess,),
            ).rowcount
        return count


def count_runs(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
