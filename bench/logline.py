"""The cost of a log line: per line in-process, and the real daemon's CPU per run, for this
tree against another (--base, a checkout of the version to compare with), interleaved.

    .venv/bin/python bench/logline.py --base /tmp/log-base [--repeat 5] [--lines 20000]
        [--daemon-jobs 1000] [--daemon-seconds 10] [--no-daemon] [--orjson DIR]

In-process (CPU time, process_time, JSON to a pipe that a `cat` child drains, uvloop):
- `run line, own iteration`: the daemon's `run` line, one per loop iteration (a callback
  that logs and schedules the next): what a spread-out run pays, the loop's turn included;
- `1,000 lines per iteration`: a burst's lines, each iteration logging 1,000;
- `renderer only`: the JSON processors' work for one line, no output.
With --orjson DIR (a folder holding the orjson package, e.g. `pip install --target DIR
orjson`), the renderer with orjson's dumps too, for comparison (taskd does not use it).

Real daemon: `taskd run` with --daemon-jobs trivial io jobs every 1 s, JSON log to a pipe
drained by `cat`, state on disk, uvloop: its CPU over --daemon-seconds / runs.

Each figure is run --repeat times, this tree and --base alternating (A B A B ...), each run
in a fresh process; prints the median and min-max of each. Asserts nothing."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from steady import _config as steady_config  # bench/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter with PYTHONPATH set to the tree under test; prints JSON.
PROBE = r"""
import asyncio, io, json, os, subprocess, sys, time
import structlog, uvloop
from taskd import log as logsetup

mode, lines = sys.argv[1], int(sys.argv[2])
cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
stream = open(cat.stdin.fileno(), "w", closefd=False)
logsetup.configure("info", "json", stream)
log = structlog.get_logger("taskd.run").bind()
FIELDS = {"run_id": "9f3a1c000042", "attempt": 1, "outcome": "succeeded",
          "duration": 0.000123, "late": 0.001234}

def line(n):
    log.info("run", job=f"j{n % 1000}", **FIELDS)

async def own_iteration():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [lines]
    def step():
        line(left[0])
        left[0] -= 1
        if left[0]:
            loop.call_soon(step)
        else:
            done.set_result(None)
    t0 = time.process_time()
    loop.call_soon(step)
    await done
    await asyncio.sleep(0)
    return time.process_time() - t0

async def per_iteration_1000():
    t0 = time.process_time()
    for it in range(lines // 1000):
        for n in range(1000):
            line(n)
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    return time.process_time() - t0

def renderer(dumps=None):
    procs = list(structlog.get_config()["processors"])
    if dumps is not None:  # the same processors, the last one's encoder swapped
        if hasattr(procs[-1], "_encode"):  # JsonLines
            procs[-1]._encode = dumps
        else:
            procs[-1] = structlog.processors.JSONRenderer(serializer=lambda o, **kw: dumps(o))
    t0 = time.process_time()
    for n in range(lines):
        ed = {"job": f"j{n % 1000}", **FIELDS, "event": "run"}
        for p in procs:
            ed = p(None, "info", ed)
    return time.process_time() - t0

if mode == "own":
    cpu = uvloop.run(own_iteration())
elif mode == "burst":
    cpu = uvloop.run(per_iteration_1000())
elif mode == "render":
    cpu = renderer()
elif mode == "orjson":
    import orjson
    fallback = structlog.processors.JSONRenderer()._dumps_kw["default"]
    cpu = renderer(lambda obj: orjson.dumps(obj, default=fallback).decode())
stream.flush()
cat.stdin.close()
cat.wait()
print(json.dumps({"us_per_line": cpu / lines * 1e6}))
"""


def _env(tree: Path, extra: str = "") -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), extra) if p)}
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def probe(tree: Path, mode: str, lines: int, extra: str = "") -> float:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(lines)],
        env=_env(tree, extra),
        cwd=tree,  # `-c` puts the current folder first on sys.path, ahead of PYTHONPATH
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(json.loads(done.stdout)["us_per_line"])


def daemon(tree: Path, jobs: int, seconds: float) -> float:
    """CPU per run (µs) of `taskd run` from ``tree`` with ``jobs`` jobs every 1 s."""
    with tempfile.TemporaryDirectory() as d:
        config = steady_config(Path(d), jobs, "1s")  # steady.py's trivial io jobs
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert cat.stdin is not None
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskd", "run", "-c", str(config)],
            stdout=cat.stdin,
            stderr=subprocess.DEVNULL,
            cwd=config.parent,
            env={**_env(tree), "PYTHONUNBUFFERED": "1"},  # as the unit file
        )
        cat.stdin.close()
        try:
            time.sleep(4)  # start-up, plugin load, first ticks
            c0, t0 = _cpu(proc.pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = _cpu(proc.pid), time.monotonic()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            cat.wait(timeout=10)
    return (c1 - c0) / ((t1 - t0) * jobs) * 1e6


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _row(label: str, base: list[float], ours: list[float]) -> str:
    def cell(xs: list[float]) -> str:
        return f"{statistics.median(xs):7.2f} ({min(xs):.2f}-{max(xs):.2f})"

    ratio = statistics.median(ours) / statistics.median(base)
    return f"{label:<34} {cell(base):>24} {cell(ours):>24} {ratio:>6.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="the tree to compare with")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--daemon-jobs", type=int, default=1000)
    parser.add_argument("--daemon-seconds", type=float, default=10.0)
    parser.add_argument("--no-daemon", action="store_true")
    parser.add_argument("--orjson", default="", help="a folder holding the orjson package")
    args = parser.parse_args()
    cases = [
        ("run line, own iteration (us)", "own"),
        ("1,000 lines per iteration (us)", "burst"),
        ("renderer only (us)", "render"),
    ]
    if args.orjson:
        cases.append(("renderer with orjson (us)", "orjson"))
    results: dict[str, tuple[list[float], list[float]]] = {}
    for label, mode in cases:
        base: list[float] = []
        ours: list[float] = []
        for _ in range(args.repeat):
            base.append(probe(args.base, mode, args.lines, args.orjson))
            ours.append(probe(HERE, mode, args.lines, args.orjson))
        results[label] = (base, ours)
    if not args.no_daemon:
        base, ours = [], []
        for _ in range(args.repeat):
            base.append(daemon(args.base, args.daemon_jobs, args.daemon_seconds))
            ours.append(daemon(HERE, args.daemon_jobs, args.daemon_seconds))
        results[f"daemon CPU per run, {args.daemon_jobs} jobs/1s (us)"] = (base, ours)
    print(f"per line / per run, median (min-max) of {args.repeat}, load {os.getloadavg()[0]:.2f}")
    print(f"{'measure':<34} {'base':>24} {'this tree':>24} {'ratio':>7}")
    for label, (base, ours) in results.items():
        print(_row(label, base, ours))


if __name__ == "__main__":
    main()
