"""What the kept pool buys: sql_query runs with the job's pool kept vs a new pool per run.

    .venv/bin/python bench/sql_pool.py [--runs 200]

Starts a throw-away PostgreSQL 15 and MariaDB (tests/dbservers.py; needs initdb/postgres and
mariadbd, as the tests do) and runs plugins/sql_query.py the way the daemon does (a
JobContext per run, one Resources registry per job), with `SELECT count(*) FROM orders`:
- kept: one registry for every run, so the pool (and its connection) is reused;
- per run: a registry per run, closed after it: connect, authenticate (scram / native
  password), query, close, as a plugin without ctx.resource would.
Prints one table of per-run wall time (median, p95) and the server's session count after the
runs; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from taskd.run.context import JobContext  # noqa: E402
from taskd.run.resources import Resources  # noqa: E402
from taskd.state.shared import SharedState  # noqa: E402
from tests.dbservers import REPORT_PASSWORD, MariaServer, PgServer, _serve  # noqa: E402


def load_plugin() -> Any:
    spec = importlib.util.spec_from_file_location("_bench_sql_query", ROOT / "plugins/sql_query.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def measure(mod: Any, server: Any, pwfile: Path, runs: int, kept: bool) -> list[float]:
    job = f"bench-{'kept' if kept else 'fresh'}"
    shared = Resources(structlog.get_logger("bench"))
    times = []
    for i in range(runs):
        resources = shared if kept else Resources(structlog.get_logger("bench"))
        ctx = JobContext(
            job=job,
            run_id=str(i),
            attempt=1,
            scheduled=time.time(),
            state=SharedState(),
            resources=resources,
        )
        start = time.perf_counter()
        try:
            await mod.sql_query(
                ctx,
                dsn=server.dsn(),
                query="SELECT count(*) AS n FROM orders",
                password_file=str(pwfile),
            )
        finally:
            ctx.release_resources()
            if not kept:
                await resources.close_all()
        times.append((time.perf_counter() - start) * 1000)
    await shared.close_all()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(open("/dev/null", "w")))  # noqa: SIM115
    mod = load_plugin()
    pwfile = Path(tempfile.mkdtemp()) / "pw"
    pwfile.write_text(REPORT_PASSWORD)
    rows = []
    for cls in (PgServer, MariaServer):
        gen = _serve(cls)
        server = next(gen)
        try:
            for kept in (True, False):
                times = asyncio.run(measure(mod, server, pwfile, args.runs, kept))
                job = f"bench-{'kept' if kept else 'fresh'}"
                left = (
                    len(server.connections(f"taskd/{job}"))
                    if isinstance(server, PgServer)
                    else len(server.connections())
                )
                times.sort()
                rows.append(
                    (
                        cls.name,
                        "kept" if kept else "per run",
                        statistics.median(times),
                        times[int(len(times) * 0.95) - 1],
                        left,
                    )
                )
        finally:
            next(gen, None)
    print(f"{'server':<11} {'pool':<8} {'median ms':>10} {'p95 ms':>8} {'sessions after':>15}")
    for name, mode, med, p95, left in rows:
        print(f"{name:<11} {mode:<8} {med:>10.2f} {p95:>8.2f} {left:>15}")


if __name__ == "__main__":
    main()
