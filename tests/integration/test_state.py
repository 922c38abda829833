"""The state database: run history rows, surviving kill -9 at any moment without running a
tick twice, interrupted runs, and a corrupt file moved aside rather than overwritten."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from tests.helpers import DaemonProc

ST = """
import asyncio

import taskd


async def nap(ctx, seconds: float = 0.0, fail: str = "") -> dict:
    ctx.log.info("nap_start")
    if seconds:
        await asyncio.sleep(seconds)
    if fail:
        raise ValueError(fail)
    return {"ok": True}


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("nap", nap)]
"""

PLUGINS = {"st.py": ST}
# Busy 40% of the time, so a random kill often lands inside a run.
FAST = '[jobs.fast]\ntype = "nap"\nevery = "50ms"\n[jobs.fast.options]\nseconds = 0.02\n'


def db_file(d: DaemonProc) -> Path:
    return d.dir / "state" / "state.db"


def integrity(d: DaemonProc) -> str:
    with d.db() as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def last_tick(d: DaemonProc, job: str) -> float | None:
    with d.db() as db:
        row = db.execute("SELECT last_tick FROM jobs WHERE name = ?", (job,)).fetchone()
    return None if row is None else row[0]


class TestHistory:
    """Each run leaves one history row with its tick, start, duration, outcome and error."""

    def test_rows_have_the_run_fields(self, daemon_factory) -> None:
        d = daemon_factory(
            """
            [jobs.good]
            type = "nap"
            on = "startup"

            [jobs.bad]
            type = "nap"
            on = "startup"
            [jobs.bad.options]
            fail = "nope"
            """,
            PLUGINS,
        ).start()
        d.wait_for("run", job="good", timeout=3)
        d.wait_for("run", job="bad", timeout=3)
        assert d.stop() == 0
        logged = {r["job"]: r for r in d.events("run")}
        for job, outcome, error in (
            ("good", "succeeded", None),
            ("bad", "failed", "ValueError: nope"),
        ):
            (row,) = d.history(job)
            assert row["job"] == job
            assert row["run_id"] == logged[job]["run_id"]
            assert isinstance(row["scheduled"], float)
            assert row["started"] >= row["scheduled"]
            assert 0 <= row["duration"] < 1
            assert row["outcome"] == outcome
            assert row["error"] == error
            assert row["attempts"] == 1


class TestKill9:
    """kill -9 at any moment leaves a readable database and never runs a tick twice."""

    def test_repeated_kill9_keeps_db_sound(self, daemon_factory) -> None:
        rng = random.Random()
        prev: float | None = None
        waits = []
        for cycle in range(5):
            d = daemon_factory(FAST, PLUGINS).start()
            d.wait_for("run", job="fast", timeout=3)
            waits.append(round(rng.uniform(0.0, 0.3), 3))
            time.sleep(waits[-1])  # kill at a random moment between runs or inside one
            d.kill()
            assert integrity(d) == "ok", (cycle, waits)
            tick = last_tick(d, "fast")
            assert tick is not None
            assert prev is None or tick >= prev, (cycle, prev, tick, waits)
            prev = tick
            rows = d.history("fast")
            # A run is recorded only after its tick: the cursor covers every run in history.
            assert max(r["scheduled"] for r in rows) <= tick, (cycle, waits)
            dupes = [t for t, n in Counter(r["scheduled"] for r in rows).items() if n > 1]
            assert dupes == [], (cycle, dupes, waits)
        d = daemon_factory(FAST, PLUGINS).start()
        d.wait_for("run", job="fast", count=2, timeout=3)
        assert d.stop() == 0
        rows = d.history("fast")
        assert Counter(r["scheduled"] for r in rows).most_common(1)[0][1] == 1
        assert {r["outcome"] for r in rows} <= {"succeeded", "interrupted"}
        assert len(rows) >= 12

    def test_run_in_flight_becomes_interrupted(self, daemon_factory) -> None:
        config = '[jobs.long]\ntype = "nap"\non = "startup"\n[jobs.long.options]\nseconds = 5.0\n'
        d = daemon_factory(config, PLUGINS).start()
        run_id = d.wait_for("nap_start", job="long", timeout=3)[0]["run_id"]
        d.kill()
        # On record before the job ran: committed as "running", or (killed within the same
        # loop iteration, before the batched commit) in the tick journal.
        rows = d.history("long")
        journal = (d.dir / "state" / "ticks.journal").read_text()
        assert [(r["run_id"], r["outcome"]) for r in rows] == [(run_id, "running")] or (
            not rows and f"R\t{run_id}\tlong\t" in journal
        )
        again = daemon_factory(config, PLUGINS).start()
        assert again.wait_for("runs_interrupted", timeout=3)[0]["count"] == 1
        rows = {r["run_id"]: r for r in again.history("long")}
        assert rows[run_id]["outcome"] == "interrupted"
        assert rows[run_id]["error"]
        again.kill()


class TestCorruptState:
    """A state.db that is not a database is moved aside, kept byte for byte, and replaced."""

    def test_garbage_db_is_moved_aside(self, daemon_factory) -> None:
        d = daemon_factory(FAST, PLUGINS)
        garbage = bytes(range(256)) * 64 + b"this is not a database" * 100
        db_file(d).parent.mkdir(parents=True)
        db_file(d).write_bytes(garbage)
        d.start()
        line = d.events("state_corrupt")
        assert line, d.raw[-20:]
        assert line[0]["path"] == str(db_file(d))
        moved = Path(line[0]["moved_to"])
        assert moved != db_file(d) and moved.parent == db_file(d).parent
        assert moved.read_bytes() == garbage
        d.wait_for("run", job="fast", outcome="succeeded", count=2, timeout=3)
        assert d.stop() == 0
        assert integrity(d) == "ok"
        assert len(d.history("fast")) >= 2
        assert moved.read_bytes() == garbage

    def test_earlier_aside_copy_is_not_overwritten(self, daemon_factory) -> None:
        d = daemon_factory(FAST, PLUGINS)
        state = db_file(d).parent
        state.mkdir(parents=True)
        # Copies set aside by an earlier corruption in the same second (their names carry
        # only the second): simulated for every second this start could fall in.
        now = time.time()
        earlier = {}
        for offset in range(-1, 15):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now + offset))
            earlier[state / f"state.db.corrupt-{stamp}"] = f"earlier copy {offset}".encode()
        for path, data in earlier.items():
            path.write_bytes(data)
        garbage = b"not a database, second time" * 200
        db_file(d).write_bytes(garbage)
        d.start()
        moved = Path(d.wait_for("state_corrupt", timeout=3)[0]["moved_to"])
        assert moved.read_bytes() == garbage
        lost = [p.name for p, data in earlier.items() if p.read_bytes() != data]
        assert lost == [], f"earlier set-aside copies overwritten: {lost}"
