"""Fleet runs per second that 3 real taskd hosts sustain against one PostgreSQL (issue 10).

    .venv/bin/python bench/fleet_hosts.py [--repeat 3] [--sizes 100,500,1000,2000] [--quick]
                                          [--json FILE]

Starts a throw-away PostgreSQL 15 (tests/dbservers.py PgServer: loopback, fsync,
synchronous_commit and full_page_writes off, as the tests run it) and, per measurement, a
fresh fleet database and 3 real `taskd run` hosts (h1-h3) on the same config, each as
bench/compare.py runs one: its state on disk in a temp dir, its JSON log to a pipe this
bench drains, uvloop, READY=1 on a NOTIFY_SOCKET. The config: N io jobs `every = "1s"`,
`offset` i/N (N runs/s spread over the second), `overlap = "skip"`, `scope = "fleet"`, and a
`[fleet]` table with the defaults (lease 30 s). The job (bench/compare_dropin.py) records its
own lateness: start time minus `ctx.scheduled`, so for a fleet run it includes the claim's
round trip. For each N, in each round:

- fleet, 3 hosts: over a window of whole seconds after a warm-up, fleet runs/s started
  across the hosts; the window's ticks (N per second) run exactly once (one run recorded on
  some host and one claim row per tick, every row distinct), missed (no run by the time the
  hosts stop, >= 1 s after the window), run twice, and the window's claims not yet ended
  (`running`) 3 s after it (their finish not yet written); p50/p99 lateness; the 3 hosts'
  CPU per run (user + system, their threads and children); PostgreSQL's CPU per run (the
  postmaster, its live children and those it reaped: every backend, the hosts' sessions
  among them, and autovacuum); the cores busy (both, over the window);
- host, 1 host: the same N as `scope = "host"` on one taskd (no database): the single-host
  cost of the same schedule.
Then the highest N with p99 <= 100 ms and every tick run once (its claim ended within 3 s)
on 3 hosts, bracketed by the round's sizes (doubled past the last one, halved below the
first, if need be) and bisected geometrically (twice; once with --quick) with a shorter
window. Prints one Markdown table,
medians of the rounds with min-max, and the load average at start and end. Asserts
nothing. Everything it starts is stopped at exit, on Ctrl-C or SIGTERM too."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compare_proc import HERE, ROOT, Records, Running, _Drain, compile_tree, pct

sys.path.insert(0, str(ROOT))

import psutil

from tests.dbservers import FLEET_PASSWORD, PgServer, _serve

HOSTS = 3
Figures = dict[str, float]
_live: list[Running] = []  # every daemon started and not yet cleaned up, for the exit path


def tree_cpu(ps: psutil.Process) -> float:
    """CPU seconds of a process and all its descendants, dead or alive: its own, those of the
    children it reaped (the kernel adds them to its cutime/cstime), and its live children's.
    A difference of two readings is exact whatever came and went in between."""
    total = 0.0
    for p in (ps, *ps.children(recursive=True)):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue  # exited between the listing and the read; its parent has it now
        total += t.user + t.system + t.children_user + t.children_system
    return total


def write_config(folder: Path, n: int, fleet: str | None) -> Path:
    """N jobs every 1 s at offsets i/N; `fleet`: the [fleet] table (their scope is fleet)."""
    (folder / "plugins.d").mkdir(parents=True, exist_ok=True)
    (folder / "plugins.d" / "benchjobs.py").write_text((HERE / "compare_dropin.py").read_text())
    lines = [
        "[daemon]",
        'plugin_dirs = ["plugins.d"]',
        'state_dir = "state"',
        'runtime_dir = "run"',
        'log_format = "json"',
        "entry_points = false",
    ]
    if fleet:
        lines.append(fleet)
    for i in range(n):
        lines += [f"[jobs.j{i}]", 'type = "bench_record"', 'every = "1s"', 'overlap = "skip"']
        if i:
            lines.append(f'offset = "{i * 1000 / n:.6f}ms"')
        if fleet:
            lines.append('scope = "fleet"')
    path = folder / "taskd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_host(n: int, fleet: str | None, name: str) -> Running:
    """One `taskd run` (not yet READY: the caller waits, so that hosts start together)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"taskd-fleethosts-{name}-"))
    config = write_config(workdir, n, fleet)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    out = workdir / "records.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NOTIFY_SOCKET": str(workdir / "notify"),
        "TASKD_BENCH_OUT": str(out),
    }
    spawned = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskd", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env=env,
    )
    run = Running(name, proc, _Drain(proc, None), out, workdir, spawned, notify=notify)
    _live.append(run)
    return run


def stop_hosts(runs: list[Running]) -> list[Records]:
    """SIGTERM to every host at once (one signal each: a second one stops at once), then
    what each recorded."""
    try:
        with ThreadPoolExecutor(len(runs)) as ex:
            return list(ex.map(Running.stop, runs))
    finally:
        for run in runs:
            run.cleanup()
            _live.remove(run)


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def measure(pg: PgServer, pwfile: Path, n: int, fleet: bool, window: int, warm: float) -> Figures:
    """One measurement: N jobs on 3 fleet hosts (fleet) or on one host (scope host)."""
    db = f"bench_{uuid.uuid4().hex[:10]}"
    hosts: list[Running] = []
    try:
        table = None
        if fleet:
            dsn = pg.fleet_db(db)
            table = f'[fleet]\ndsn = "{dsn}"\npassword_file = "{pwfile}"\nnode = "{{node}}"'
        for h in range(HOSTS if fleet else 1):
            node = f"h{h + 1}"
            hosts.append(start_host(n, table.replace("{node}", node) if table else None, node))
        for run in hosts:
            run.wait_ready()
        assert pg.proc is not None
        postmaster = psutil.Process(pg.proc.pid)
        lo = math.ceil(time.time() + warm)
        hi = lo + window
        _sleep_until(lo)
        pg0, cpu0 = tree_cpu(postmaster), [tree_cpu(r.ps) for r in hosts]
        _sleep_until(hi)
        pg1, cpu1 = tree_cpu(postmaster), [tree_cpu(r.ps) for r in hosts]
        expected = n * window
        rows = (0, 0, 0)
        if fleet:  # until the window's claims have all ended (or 3 s past the window)
            query = (
                "SELECT count(*), count(DISTINCT (job, tick)),"
                " count(*) FILTER (WHERE state = 'succeeded') FROM taskd.claims"
                " WHERE kind = 's' AND tick >= to_timestamp($1) AND tick < to_timestamp($2)"
            )
            deadline = hi + 3.0
            while True:
                time.sleep(0.25)
                rows = pg.sql(query, float(lo), float(hi), db=db)[0]
                if rows[2] >= expected or time.time() > deadline:
                    break
        else:
            time.sleep(1.0)
        records = stop_hosts(hosts)
        hosts = []
    finally:
        for run in hosts:  # an error before the stop: kill them, nothing to read
            run.cleanup()
            _live.remove(run)
        if fleet:
            pg.sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', db="postgres")
    started = sum(1 for r in records for s in r.started if lo <= s < hi)
    late = sorted(x for r in records for x in r.late(lo, hi))
    per_tick = Counter(
        (j, round(t * 1e6))
        for r in records
        for j, t in zip(r.job, r.scheduled, strict=True)
        if lo <= t < hi
    )
    once = sum(1 for c in per_tick.values() if c == 1)
    figures: Figures = {
        "runs_s": started / window,
        "once_pct": 100 * once / expected,
        "missed": expected - len(per_tick),
        "twice": sum(c - 1 for c in per_tick.values()),
        "p50_ms": pct(late, 0.5) * 1e3,
        "p99_ms": pct(late, 0.99) * 1e3,
        "taskd_us": (sum(cpu1) - sum(cpu0)) / max(started, 1) * 1e6,
        "cores": (sum(cpu1) - sum(cpu0) + (pg1 - pg0 if fleet else 0.0)) / window,
    }
    if fleet:
        figures["pg_us"] = (pg1 - pg0) / max(started, 1) * 1e6
        # One claim row per tick, all distinct: 1 per round where it held.
        figures["claims_ok"] = float(rows[0] == rows[1] == expected)
        # Claims of the window still 'running' 3 s after it: finishes not yet written (each
        # host writes them one round trip at a time), so the job's next tick is refused
        # under overlap = "skip" on every host.
        figures["unfinished"] = float(rows[0] - rows[2])
    return figures


def passes(f: Figures) -> bool:
    """p99 <= 100 ms, every tick run once, one claim row each, all ended within 3 s."""
    return (
        f["p99_ms"] <= 100
        and f["once_pct"] == 100
        and f.get("claims_ok", 1.0) == 1.0
        and f.get("unfinished", 0.0) == 0
    )


def _sig(x: float) -> int:
    """x rounded to 2 significant digits (the bisection's steps)."""
    return int(round(x, 1 - math.floor(math.log10(x))))


def highest(probe: Callable[[int], bool], sizes: dict[int, bool], bisections: int) -> int:
    """The highest N that passes: bracketed by the sizes measured (doubling past the largest,
    halving below the smallest), then `bisections` geometric bisections. 0: none found."""
    fails = [n for n, ok in sizes.items() if not ok]
    hi = min(fails) if fails else 0
    oks = [n for n, ok in sizes.items() if ok and (not hi or n < hi)]
    lo = max(oks) if oks else 0
    while not hi and lo < 64_000:
        lo, hi = (lo * 2, 0) if probe(lo * 2) else (lo, lo * 2)
    while not lo and hi > 25:
        lo, hi = (hi // 2, hi) if probe(hi // 2) else (0, hi // 2)
    for _ in range(bisections if lo and hi else 0):
        mid = _sig(math.sqrt(lo * hi))
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return lo


def _num(v: float) -> str:
    if v != v:
        return "-"
    if abs(v) >= 100 or v == int(v):
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    med = _num(statistics.median(values))
    return med if len(values) == 1 else f"{med} ({_num(min(values))}-{_num(max(values))})"


COLUMNS = (
    ("runs_s", "runs/s"),
    ("once_pct", "ticks run once (%)"),
    ("missed", "missed"),
    ("twice", "run twice"),
    ("claims_ok", "claim rows = ticks (rounds)"),
    ("unfinished", "claims not ended 3 s after"),
    ("p50_ms", "p50 late (ms)"),
    ("p99_ms", "p99 late (ms)"),
    ("taskd_us", "taskd CPU/run (us)"),
    ("pg_us", "PostgreSQL CPU/run (us)"),
    ("cores", "cores busy"),
)


def table(results: dict[tuple[int, str], list[Figures]], best: list[int]) -> list[str]:
    head = ["N jobs every 1 s", "scope (hosts)", *(label for _, label in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (n, scope), runs in results.items():
        cells = []
        for key, _ in COLUMNS:
            vals = [r[key] for r in runs if key in r]
            if key == "claims_ok":
                cells.append(f"{sum(vals):.0f} of {len(vals)}" if vals else "")
            else:
                cells.append(_cell(vals))
        where = "fleet (3)" if scope == "fleet" else "host (1)"
        lines.append("| " + " | ".join([f"{n:,}", where, *cells]) + " |")
    label = "highest N: p99 <= 100 ms, every tick once"
    lines.append(
        f"| {label} | fleet (3) | {_cell([float(b) for b in best])} |" + " |" * (len(COLUMNS) - 1)
    )
    return lines


def _probe(pg: PgServer, pwfile: Path, window: int, tag: str, n: int) -> bool:
    """A shorter measurement of N on 3 hosts: does it pass?"""
    f = measure(pg, pwfile, n, True, window, 1.5)
    print(f"{tag} probe N={n}: {'pass' if passes(f) else 'fail'} "
          f"(p99 {_num(f['p99_ms'])} ms, once {_num(f['once_pct'])}%)",
          file=sys.stderr)  # fmt: skip
    return passes(f)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so the `finally`s stop the hosts and the server


def main() -> None:
    # SIGINT too: a shell starting this in the background leaves it ignored otherwise.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--sizes", help="N, comma-separated (default 100,500,1000,2000)")
    parser.add_argument("--quick", action="store_true", help="shorter windows: under 2 minutes")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    sizes = [int(x) for x in (args.sizes or "100,500,1000,2000").split(",") if x.strip()]
    if args.quick and not args.sizes:
        sizes = [100, 500, 1000]
    window, warm, probe_window = (3, 1.5, 2) if args.quick else (5, 2.0, 3)
    compile_tree(ROOT)
    load_start = os.getloadavg()
    began = time.time()
    results: dict[tuple[int, str], list[Figures]] = {}
    best: list[int] = []
    gen = _serve(PgServer)
    pg = next(gen)
    workdir = Path(tempfile.mkdtemp(prefix="taskd-fleethosts-"))
    pwfile = workdir / "fleet.pw"
    pwfile.write_text(FLEET_PASSWORD + "\n")
    pwfile.chmod(0o600)
    try:
        for rnd in range(repeat):
            ok: dict[int, bool] = {}
            for n in sizes:
                for scope in ("fleet", "host"):
                    t = time.time()
                    f = measure(pg, pwfile, n, scope == "fleet", window, warm)
                    results.setdefault((n, scope), []).append(f)
                    if scope == "fleet":
                        ok[n] = passes(f)
                    shown = ", ".join(f"{k}={_num(v)}" for k, v in f.items())
                    print(f"[{rnd + 1}/{repeat}] N={n} {scope:<5} {time.time() - t:4.1f} s  {shown}",
                          file=sys.stderr)  # fmt: skip

            tag = f"[{rnd + 1}/{repeat}]"
            probe = functools.partial(_probe, pg, pwfile, probe_window, tag)
            best.append(highest(probe, ok, 1 if args.quick else 2))
    finally:
        for run in list(_live):
            run.cleanup()
        gen.close()  # stops the server (its `finally`)
        pwfile.unlink(missing_ok=True)
        workdir.rmdir()
    load_end = os.getloadavg()
    print(
        f"{HOSTS} taskd hosts (fleet) and 1 (host) against one PostgreSQL 15 on loopback "
        f"(fsync off, as the tests run it); median (min-max) of {repeat}"
        f"{', quick' if args.quick else ''}; {window} s windows; {time.time() - began:.0f} s"
    )
    print(
        f"load average (1/5/15 min): start {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"end {' '.join(f'{x:.2f}' for x in load_end)}"
    )
    print()
    print("\n".join(table(results, best)))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "repeat": repeat,
                    "quick": args.quick,
                    "load": {"start": load_start, "end": load_end},
                    "results": [[n, s, r] for (n, s), r in results.items()],
                    "highest": best,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
