"""The real daemon at a steady rate, and idle: CPU per run, memory and CPU per idle job.

    .venv/bin/python bench/steady.py [--rate 1000] [--idle 10000] [--seconds 10] [--repeat 3]

Starts `taskd run` as a process (uvloop, JSON logs to /dev/null, state in a temp dir):
- steady: --rate jobs of a trivial io job, each `every = "1s"`: --rate runs per second;
  CPU seconds used over --seconds / runs = CPU per run (one `run` log line, history row and
  journal writes each);
- idle: --idle jobs `every = "1h"` against a daemon with no jobs: RSS difference / jobs,
  and CPU used over 5 s.
--metrics: the steady figure again with metrics_address set (the metrics sink's cost),
interleaved with the plain one. Medians of --repeat. Prints one table; asserts nothing."""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PLUGIN = """
import taskd

async def trivial(ctx) -> None:
    return None

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("trivial", trivial)]
"""


def _config(folder: Path, jobs: int, every: str, metrics: bool = False) -> Path:
    (folder / "plugins.d").mkdir(parents=True, exist_ok=True)
    (folder / "plugins.d" / "trivial.py").write_text(PLUGIN)
    head = '[daemon]\nplugin_dirs = ["plugins.d"]\nstate_dir = "state"\nruntime_dir = "run"\nlog_format = "json"\n'
    if metrics:
        # The metrics sink runs for every run; nothing scrapes, so this is its cost alone.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        head += f'metrics_address = "127.0.0.1:{port}"\n'
    body = "".join(f'[jobs.j{i}]\ntype = "trivial"\nevery = "{every}"\n' for i in range(jobs))
    path = folder / "taskd.toml"
    path.write_text(head + body)
    return path


def _start(config: Path) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    taskd = Path(sys.executable).with_name("taskd")
    proc = subprocess.Popen(
        [str(taskd), "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=config.parent,
    )
    time.sleep(4)  # start-up, plugin load, first ticks
    return proc, psutil.Process(proc.pid)


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def steady(rate: int, seconds: float, metrics: bool = False) -> float:
    with tempfile.TemporaryDirectory() as d:
        proc, p = _start(_config(Path(d), rate, "1s", metrics))
        c0, t0 = _cpu(p), time.time()
        time.sleep(seconds)
        c1, t1 = _cpu(p), time.time()
        _stop(proc)
    return (c1 - c0) / ((t1 - t0) * rate)


def idle(jobs: int) -> tuple[float, float]:
    rss = []
    cpu = 0.0
    for n in (0, jobs):
        with tempfile.TemporaryDirectory() as d:
            proc, p = _start(_config(Path(d), n, "1h"))
            time.sleep(1)
            c0 = _cpu(p)
            time.sleep(5)
            cpu = _cpu(p) - c0
            rss.append(p.memory_info().rss)
            _stop(proc)
    return (rss[1] - rss[0]) / jobs, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--metrics", action="store_true", help="also a daemon with metrics_address set (its sink)"
    )
    args = parser.parse_args()
    per_run = []
    with_metrics = []
    for _ in range(args.repeat):  # interleaved: the machine's noise hits both alike
        per_run.append(steady(args.rate, args.seconds))
        if args.metrics:
            with_metrics.append(steady(args.rate, args.seconds, metrics=True))
    idles = [idle(args.idle) for _ in range(args.repeat)]
    print(f"taskd run (uvloop), median of {args.repeat}")
    print(f"{'measure':<44} {'value':>12}")
    print(f"{f'CPU per run at {args.rate} runs/s':<44} {statistics.median(per_run) * 1e6:>9.1f} us")
    if with_metrics:
        label = "same, metrics_address set"
        print(f"{label:<44} {statistics.median(with_metrics) * 1e6:>9.1f} us")
    print(
        f"{f'memory per idle job ({args.idle} jobs, RSS)':<44} {statistics.median(i[0] for i in idles):>9.0f} B"
    )
    print(
        f"{f'CPU with {args.idle} idle jobs, over 5 s':<44} {statistics.median(i[1] for i in idles) * 1000:>9.1f} ms"
    )


if __name__ == "__main__":
    main()
