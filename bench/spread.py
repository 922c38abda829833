"""The real daemon under a spread-out load: CPU per run and lateness, for one or more trees.

    .venv/bin/python bench/spread.py [--jobs 1000] [--seconds 10] [--repeat 3] [--burst] TREE...

Each TREE is a directory put first on PYTHONPATH (``/work/main``, a baseline from
``git archive``), run in turn, interleaved (A B A B ...). ``taskd run`` gets --jobs io jobs,
JSON logs to a pipe, and its state_dir under --state-root (on disk, not tmpfs: the disk is
what is measured). Job i runs every ``1 + (i - jobs/2) * 2e-7`` s: each interval differs, and
every ``every`` is anchored at the epoch, so the jobs' phases are spread over the second and
about --jobs runs a second start one by one (--burst: all ``every = "1s"``, firing together).
Each run records its own lateness (start - scheduled); the daemon writes them out at exit.
Prints, per tree, the median and min-max of CPU per run and of the p50/p99 lateness."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import psutil

PLUGIN = """
import os, threading, time
import taskd

_seen = []

async def probe(ctx) -> None:
    s = ctx.scheduled.timestamp()
    _seen.append((s, time.time() - s))

def _dump() -> None:
    # The daemon leaves with os._exit: written when the bench asks (a file appears).
    out = os.environ["SPREAD_LATE_FILE"]
    while not os.path.exists(out + ".now"):
        time.sleep(0.5)
    with open(out + ".tmp", "w") as fh:
        fh.write("\\n".join(f"{s!r} {late!r}" for s, late in list(_seen)))
    os.rename(out + ".tmp", out)

threading.Thread(target=_dump, daemon=True).start()

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("probe", probe)]
"""


def _config(folder: Path, jobs: int, burst: bool) -> Path:
    (folder / "plugins.d").mkdir(parents=True, exist_ok=True)
    (folder / "plugins.d" / "probe.py").write_text(PLUGIN)
    head = (
        '[daemon]\nplugin_dirs = ["plugins.d"]\nstate_dir = "state"\nruntime_dir = "run"\n'
        'log_format = "json"\n'
    )
    body = []
    for i in range(jobs):
        every = "1.0" if burst else repr(1.0 + (i - jobs // 2) * 2e-7)
        body.append(f'[jobs.j{i}]\ntype = "probe"\nevery = {every}\n')
    path = folder / "taskd.toml"
    path.write_text(head + "".join(body))
    return path


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _drain(out: IO[bytes]) -> None:
    with open(os.devnull, "wb") as null:
        shutil.copyfileobj(out, null)


def one(
    tree: str, jobs: int, seconds: float, burst: bool, root: Path
) -> tuple[float, float, float]:
    folder = Path(tempfile.mkdtemp(dir=root))
    try:
        config = _config(folder, jobs, burst)
        late_file = folder / "late.txt"
        env = dict(os.environ, PYTHONPATH=tree, SPREAD_LATE_FILE=str(late_file))
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskd", "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=folder,
            env=env,
        )
        assert proc.stdout is not None
        out = proc.stdout
        # The log goes to a pipe, read and dropped here.
        drain = threading.Thread(target=_drain, args=(out,))
        drain.start()
        p = psutil.Process(proc.pid)
        time.sleep(4)  # start-up, plugin load, first ticks
        c0, t0 = _cpu(p), time.time()
        time.sleep(seconds)
        c1, t1 = _cpu(p), time.time()
        Path(str(late_file) + ".now").touch()
        while not late_file.exists():
            time.sleep(0.1)
        proc.terminate()
        proc.wait(timeout=60)
        drain.join()
        rows = [tuple(map(float, line.split())) for line in late_file.read_text().splitlines()]
        window = sorted(late for sched, late in rows if t0 <= sched < t1)
        runs = len(window)
        p50 = window[runs // 2]
        p99 = window[min(runs - 1, int(runs * 0.99))]
        return (c1 - c0) / runs, p50, p99
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--state-root", default="/var/tmp")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {t: [] for t in args.trees}
    for _ in range(args.repeat):
        for tree in args.trees:  # interleaved: the machine's noise hits each alike
            results[tree].append(
                one(tree, args.jobs, args.seconds, args.burst, Path(args.state_root))
            )
            print(tree, *(f"{v * 1e6:.0f}" for v in results[tree][-1]), file=sys.stderr)
    layout = "burst" if args.burst else "spread"
    print(
        f"{args.jobs} jobs at 1 s, {layout}, {args.seconds:.0f} s, median (min-max) of {args.repeat}"
    )
    print(f"{'tree':<28} {'CPU/run us':>22} {'p50 late ms':>22} {'p99 late ms':>22}")
    for tree, rs in results.items():
        cells = []
        for k, scale in ((0, 1e6), (1, 1e3), (2, 1e3)):
            vals = [r[k] * scale for r in rs]
            cells.append(f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})")
        print(f"{tree:<28} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
