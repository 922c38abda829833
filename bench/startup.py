"""The real daemon's start-up, idle cost and SIGHUP with many jobs.

    .venv/bin/python bench/startup.py [--jobs 10000] [--repeat 3] [--only ready,idle,hup]
        [--base /tmp/start-base]

Starts `taskd run` (JSON log to a pipe, state in a temp dir) with --jobs trivial io jobs
`every = "1h"` and measures:
- ready: spawn to READY=1 on NOTIFY_SOCKET (wall seconds, and the daemon's CPU seconds by
  then), and RSS per job: (RSS with --jobs jobs - RSS with none) / jobs, 2 s after READY;
- idle: the daemon's CPU over 10 s once started (10,000 idle jobs should cost none), from
  cpu_times() (10 ms ticks) and from every thread's schedstat (ns);
- hup: the same daemon plus 200 probe jobs every 1 s or so (spread over the second), SIGHUP
  with the file unchanged: the largest `late` of the probe runs logged between the signal
  and 0.5 s after the `reloaded` line, against the largest in the 3 s before the signal;
- hupbusy: the same with the --jobs jobs `every = "1s"` (all due at once each second) and
  no probes (not in the default set: it loads the machine).

With --base, every figure is taken for the tree at that path too (PYTHONPATH, `python -m
taskd`), interleaved A B A B, so that load from other processes falls on both alike.
Prints one table of medians and min-max; asserts nothing."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from compare_proc import compile_tree
from steady import PLUGIN  # the same trivial io job (bench/ is the script's folder)

HERE = str(Path(__file__).resolve().parent.parent)


def _config(folder: Path, jobs: int, probes: int = 0, every: str = "1h") -> Path:
    (folder / "plugins.d").mkdir(parents=True, exist_ok=True)
    (folder / "plugins.d" / "trivial.py").write_text(PLUGIN)
    head = (
        '[daemon]\nplugin_dirs = ["plugins.d"]\nstate_dir = "state"\nruntime_dir = "run"\n'
        'log_format = "json"\n'
    )
    body = "".join(f'[jobs.j{i}]\ntype = "trivial"\nevery = "{every}"\n' for i in range(jobs))
    # Probes with intervals a few ms apart: their runs spread over the second, each in a
    # loop iteration of its own, as a spread load's are.
    body += "".join(
        f'[jobs.p{i}]\ntype = "trivial"\nevery = "{1000 + 7 * i}ms"\n' for i in range(probes)
    )
    path = folder / "taskd.toml"
    path.write_text(head + body)
    return path


class Daemon:
    """One `taskd run` with a notify socket and its JSON log read in a thread."""

    def __init__(self, tree: str, config: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock_path = str(config.parent / "notify.sock")
        self.sock.bind(self.sock_path)
        env = dict(os.environ, NOTIFY_SOCKET=self.sock_path, PYTHONPATH=tree)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskd", "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=config.parent,
            env=env,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.lines: list[tuple[float, dict[str, object]]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append((time.monotonic(), json.loads(raw)))

    def wait_notify(self, word: bytes, timeout: float = 120.0) -> float:
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(4096)
            if word in data.split(b"\n"):
                return time.monotonic()

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def cpu_ns(self) -> int:
        """On-CPU time of every thread, in ns (schedstat: cpu_times() moves in 10 ms ticks)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
        return total

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        self.sock.close()


def _run(
    tree: str,
    jobs: int,
    probes: int,
    body: Callable[[Daemon], dict[str, float]],
    every: str = "1h",
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        daemon = Daemon(tree, _config(Path(d), jobs, probes, every))
        try:
            ready = daemon.wait_notify(b"READY=1")
            out = {"ready_s": ready - daemon.t0, "ready_cpu_s": daemon.cpu()}
            out.update(body(daemon))
            return out
        finally:
            daemon.stop()


def ready_rss(tree: str, jobs: int) -> dict[str, float]:
    def settle(d: Daemon) -> dict[str, float]:
        time.sleep(2)
        return {"rss": d.rss()}

    empty = _run(tree, 0, 0, settle)
    full = _run(tree, jobs, 0, settle)
    return {
        "ready_s": full["ready_s"],
        "ready_cpu_s": full["ready_cpu_s"],
        "rss_per_job_B": (full["rss"] - empty["rss"]) / jobs,
    }


def idle(tree: str, jobs: int) -> dict[str, float]:
    def measure(d: Daemon) -> dict[str, float]:
        time.sleep(3)
        c0, n0 = d.cpu(), d.cpu_ns()
        time.sleep(10)
        return {
            "idle_cpu_ms_per_10s": (d.cpu() - c0) * 1000,
            "idle_sched_ms_per_10s": (d.cpu_ns() - n0) / 1e6,
        }

    r = _run(tree, jobs, 0, measure)
    return {k: v for k, v in r.items() if k.startswith("idle")}


def hup(tree: str, jobs: int, busy: bool = False) -> dict[str, float]:
    def measure(d: Daemon) -> dict[str, float]:
        time.sleep(4)
        sent = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        deadline = sent + 120
        done: float | None = None
        while time.monotonic() < deadline and done is None:
            time.sleep(0.1)
            done = next((t for t, e in list(d.lines) if e.get("event") == "reloaded"), None)
            if any(e.get("event") == "reload_failed" for _, e in list(d.lines)):
                raise RuntimeError("reload failed")
        if done is None:
            raise RuntimeError("no reloaded line")
        time.sleep(1.0)
        runs = [(t, e) for t, e in list(d.lines) if e.get("event") == "run"]

        def worst(lo: float, hi: float) -> float:
            late = [float(e["late"]) for t, e in runs if lo <= t <= hi]  # type: ignore[arg-type]
            return max(late) * 1000 if late else float("nan")

        return {
            "hup_to_reloaded_s": done - sent,
            "late_before_ms": worst(sent - 3, sent),
            "late_reload_ms": worst(sent, done + 0.5),
        }

    if busy:
        r = _run(tree, jobs, 0, measure, every="1s")
        return {f"busy_{k}": v for k, v in r.items() if not k.startswith("ready")}
    r = _run(tree, jobs, 200, measure)
    return {k: v for k, v in r.items() if not k.startswith("ready")}


def hup_busy(tree: str, jobs: int) -> dict[str, float]:
    return hup(tree, jobs, busy=True)


BENCHES = {"ready": ready_rss, "idle": idle, "hup": hup, "hupbusy": hup_busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="ready,idle,hup")
    ap.add_argument("--base", help="another source tree to measure interleaved (the baseline)")
    args = ap.parse_args()
    trees = {"this": HERE}
    if args.base:
        trees = {"base": args.base, "this": HERE}
    for tree in trees.values():
        compile_tree(tree)
    results: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for _ in range(args.repeat):
        for bench in args.only.split(","):
            for name, tree in trees.items():
                for key, value in BENCHES[bench](tree, args.jobs).items():
                    results[name].setdefault(key, []).append(value)
    keys = list(next(iter(results.values())))
    print(f"{args.jobs} jobs, medians of {args.repeat} (min-max); load {os.getloadavg()[0]:.2f}")
    print(f"{'figure':<22}" + "".join(f"{name:>28}" for name in trees))
    for key in keys:
        row = f"{key:<22}"
        for name in trees:
            v = results[name][key]
            row += f"{statistics.median(v):>12.3f} ({min(v):.3f}-{max(v):.3f})".rjust(28)
        print(row)


if __name__ == "__main__":
    main()
