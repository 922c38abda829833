"""What a fleet job's claim costs: the round trips of the claim protocol (taskd.fleet) against
a real PostgreSQL 15 on loopback.

    .venv/bin/python bench/fleet.py [--runs 2000] [--rounds 3] [--ticks 3000]

Starts a throw-away PostgreSQL 15 (tests/dbservers.py: fsync off, as the tests run it) and a
fresh fleet database, and measures through FleetDB, one connection pool as a host has:
- claim + finish: a won claim of a new tick, then its finish (no result), per run;
- claim + finish + result: the finish also writes the run's result fenced (taskd.state);
- losing claim: a tick another node holds already (answer: taken);
- heartbeat: one statement extending 1, 100 or 1,000 claims this node holds;
- 3 hosts: three processes, each with its own pool, race for the same --ticks ticks (claim,
  and finish when won): fleet runs per second sustained, each tick run once, and the
  server's CPU per run (its processes that lived through the race, the hosts' sessions
  among them; psutil).
Prints one table (median and p99 per operation, over the best round by median); asserts
nothing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import structlog  # noqa: E402

from taskd.config.model import FleetConfig  # noqa: E402
from taskd.fleet.db import FleetDB  # noqa: E402
from tests.dbservers import FLEET_PASSWORD, PgServer, _serve  # noqa: E402

JOB = "bench"


def _pct(times: list[float], p: float) -> float:
    times = sorted(times)
    return times[min(len(times) - 1, int(len(times) * p))]


async def _open(cfg: FleetConfig, node: str) -> FleetDB:
    db = FleetDB(cfg, node, "bench")
    await db.open()
    await db.register({JOB: "x"})
    return db


async def single(cfg: FleetConfig, runs: int, rounds: int) -> dict[str, list[float]]:
    """Per-operation times (µs) of the best round by median, per operation."""
    h1, h2 = await _open(cfg, "h1"), await _open(cfg, "h2")
    out: dict[str, list[float]] = {}

    def keep(name: str, times: list[float]) -> None:
        if name not in out or statistics.median(times) < statistics.median(out[name]):
            out[name] = times

    base = float(int(time.time()) - 600)  # whole ms apart below: distinct µs keys
    n = 0
    for _ in range(rounds):
        for label, result in (("claim + finish", None), ("claim + finish + result", "1")):
            times = []
            for _ in range(runs):
                n += 1
                t0 = time.perf_counter()
                got = await h1.claim(JOB, base + n * 1e-3, "schedule", window=3600,
                                     overlap_skip=False)  # fmt: skip
                assert got.fence is not None, got
                await h1.finish(got.fence, JOB, "succeeded", attempts=1, duration=0.001,
                                error=None, result_json=result,
                                result_key=JOB if result else None)  # fmt: skip
                times.append((time.perf_counter() - t0) * 1e6)
            keep(label, times)
        times = []
        for i in range(runs):  # ticks h1 won above
            t0 = time.perf_counter()
            got = await h2.claim(JOB, base + (n - i) * 1e-3, "schedule", window=3600,
                                 overlap_skip=False)  # fmt: skip
            times.append((time.perf_counter() - t0) * 1e6)
            assert got.why == "taken"
        keep("losing claim", times)
    for held in (1, 100, 1000):
        fences = []
        for _ in range(held):
            n += 1
            got = await h1.claim(JOB, base + n * 1e-3, "schedule", window=3600,
                                 overlap_skip=False)  # fmt: skip
            assert got.fence is not None
            fences.append(got.fence)
        for _ in range(rounds):
            times = []
            for _ in range(max(50, runs // 10)):
                t0 = time.perf_counter()
                beat = await h1.heartbeat(fences)
                times.append((time.perf_counter() - t0) * 1e6)
                assert len(beat.kept) == held
            keep(f"heartbeat, {held} fences", times)
        for f in fences:
            await h1.finish(f, JOB, "succeeded", attempts=1, duration=0.0, error=None,
                            result_json=None)  # fmt: skip
    await h1.close()
    await h2.close()
    return out


def _host(
    cfg: FleetConfig, node: str, base: float, ticks: int, start: Any, stop: Any, q: Any
) -> None:
    async def go() -> None:
        db = await _open(cfg, node)
        start.wait()
        won = 0
        for i in range(ticks):
            got = await db.claim(JOB, base + i * 0.001, "schedule", window=3600,
                                 overlap_skip=False)  # fmt: skip
            if got.fence is not None:
                won += 1
                await db.finish(got.fence, JOB, "succeeded", attempts=1, duration=0.0,
                                error=None, result_json=None)  # fmt: skip
        q.put((node, won, time.perf_counter()))
        stop.wait()  # the server's CPU is read while this host's session still exists
        await db.close()

    asyncio.run(go())


def three_hosts(cfg: FleetConfig, server: PgServer, ticks: int) -> tuple[float, int, float]:
    """(runs/s, runs, server CPU µs per run) for three host processes racing."""
    ctx = multiprocessing.get_context("fork")
    start, stop, q = ctx.Event(), ctx.Event(), ctx.Queue()
    base = time.time() - 3000 * 0.001 - 60  # all past, inside the claim window
    procs = [ctx.Process(target=_host, args=(cfg, f"r{i}", base, ticks, start, stop, q))
             for i in range(3)]  # fmt: skip
    for p in procs:
        p.start()
    time.sleep(2)  # every host connected and registered
    assert server.proc is not None
    pg = psutil.Process(server.proc.pid)
    # The server's processes as they are now (the hosts' sessions among them), read again
    # at the end: a process that comes and goes meanwhile (an autovacuum worker) is left out.
    members = [pg, *pg.children(recursive=True)]
    cpu0 = {m.pid: sum(m.cpu_times()[:2]) for m in members}
    t0 = time.perf_counter()
    start.set()
    ends = [q.get(timeout=600) for _ in procs]
    wall = max(e[2] for e in ends) - t0
    used = 0.0
    for m in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            used += sum(m.cpu_times()[:2]) - cpu0[m.pid]
    stop.set()
    for p in procs:
        p.join(30)
    runs = sum(e[1] for e in ends)
    return runs / wall, runs, used / max(runs, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ticks", type=int, default=3000)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(open("/dev/null", "w")))  # noqa: SIM115
    pwfile = Path(tempfile.mkdtemp()) / "pw"
    pwfile.write_text(FLEET_PASSWORD)
    gen = _serve(PgServer)
    server = next(gen)
    try:
        dsn = server.fleet_db(f"bench_{uuid.uuid4().hex[:8]}")
        cfg = FleetConfig(dsn=dsn, password_file=pwfile, lease=30.0, sweep=5.0)
        ops = asyncio.run(single(cfg, args.runs, args.rounds))
        rate, runs, cpu = three_hosts(cfg, server, args.ticks)
        rows = server.sql(
            f"SELECT count(*), count(DISTINCT tick) FROM taskd.claims WHERE job = '{JOB}' "
            f"AND owner LIKE 'r%'", db=dsn.rsplit("/", 1)[1]
        )  # fmt: skip
    finally:
        next(gen, None)
    print(f"{'operation (1 pool, loopback, fsync off)':<42} {'median µs':>10} {'p99 µs':>8}")
    for name, times in ops.items():
        print(f"{name:<42} {statistics.median(times):>10.0f} {_pct(times, 0.99):>8.0f}")
    print(f"{'3 hosts racing, runs/s sustained':<42} {rate:>10.0f}")
    print(
        f"{'  runs (ticks), rows, distinct ticks':<42} {runs:>10} ({args.ticks}), {rows[0][0]}, {rows[0][1]}"
    )
    print(f"{'  PostgreSQL CPU per run, µs':<42} {cpu:>10.0f}")


if __name__ == "__main__":
    main()
