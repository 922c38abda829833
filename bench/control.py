"""The control socket against the real daemon: round trips of status, jobs and ping, and what
a `taskd status` costs the schedule.

    .venv/bin/python bench/control.py [--jobs 1000 10000] [--requests 50]

For each job count, starts `taskd run` (uvloop, JSON log to a pipe that is drained, state on
disk) with that many idle jobs (`every = "1h"`) plus one `every = "100ms"` probe job, then
times --requests round trips of each command from a client in this process (the socket
only, not the CLI's start-up), and the probe's lateness while status requests come back to
back. Prints one table: medians with min-max; asserts nothing."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from steady import PLUGIN  # the same trivial io job (bench/ is on the path when run)

from taskd.control.client import request


def _config(folder: Path, jobs: int) -> Path:
    (folder / "plugins.d").mkdir(parents=True, exist_ok=True)
    (folder / "plugins.d" / "trivial.py").write_text(PLUGIN)
    head = (
        '[daemon]\nplugin_dirs = ["plugins.d"]\nstate_dir = "state"\nruntime_dir = "run"\n'
        'log_format = "json"\n'
        '[jobs.probe]\ntype = "trivial"\nevery = "100ms"\n'
    )
    body = "".join(f'[jobs.j{i}]\ntype = "trivial"\nevery = "1h"\n' for i in range(jobs))
    path = folder / "taskd.toml"
    path.write_text(head + body)
    return path


class Daemon:
    def __init__(self, config: Path) -> None:
        taskd = Path(sys.executable).with_name("taskd")
        self.proc = subprocess.Popen(
            [str(taskd), "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
        )
        self.late: list[tuple[float, float]] = []  # (when logged, late) of probe runs
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.started.wait(120):
            raise SystemExit("daemon did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("event") == "started":
                self.started.set()
            elif line.get("event") == "run" and line.get("job") == "probe":
                self.late.append((time.time(), line["late"]))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _times(sock: Path, cmd: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        request(sock, cmd)
        out.append((time.perf_counter() - t) * 1000)
    return out


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--requests", type=int, default=50)
    args = ap.parse_args()
    rows = []
    for jobs in args.jobs:
        with tempfile.TemporaryDirectory() as tmp:
            d = Daemon(_config(Path(tmp), jobs))
            try:
                sock = Path(tmp) / "run" / "control.sock"
                time.sleep(1.0)
                quiet_from = time.time()
                time.sleep(2.0)
                quiet = [late for when, late in d.late if when >= quiet_from]
                ping = _times(sock, "ping", args.requests)
                status_from = time.time()
                status = _times(sock, "status", args.requests)
                status_to = time.time()
                loaded = [late for when, late in d.late if status_from <= when <= status_to]
                jobs_cmd = _times(sock, "jobs", args.requests)
                size = len(json.dumps(request(sock, "status")))
            finally:
                d.stop()
        rows.append((jobs, ping, status, jobs_cmd, size, quiet, loaded))
    print(f"{args.requests} round trips each, ms: median (min-max); probe lateness in ms")
    print(
        f"{'jobs':>6}  {'ping':>22}  {'status':>22}  {'jobs':>22}  {'status KB':>9}  "
        f"{'probe late idle p50/max':>24}  {'probe late during status p50/max':>32}"
    )
    for jobs, ping, status, jobs_cmd, size, quiet, loaded in rows:
        q = f"{statistics.median(quiet) * 1000:.2f} / {max(quiet) * 1000:.2f}" if quiet else "-"
        ld = f"{statistics.median(loaded) * 1000:.2f} / {max(loaded) * 1000:.2f}" if loaded else "-"
        print(
            f"{jobs:>6}  {_fmt(ping):>22}  {_fmt(status):>22}  {_fmt(jobs_cmd):>22}  "
            f"{size / 1024:>9.0f}  {q:>24}  {ld:>32}"
        )


if __name__ == "__main__":
    main()
