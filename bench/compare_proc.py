"""Processes for bench/compare.py: the real taskd daemon and the worker engines, side by side.

Each engine runs in a fresh process with its output going to a pipe that a thread here drains
(so a daemon that logs a line per run pays for the write, as under systemd). `start_taskd`
runs `python -m taskd run` from a source tree, its state on disk in a temp dir, and waits for
READY=1 on a NOTIFY_SOCKET this module listens on; `start_worker` runs compare_workers.py and
waits for the line it prints once its jobs are scheduled."""

from __future__ import annotations

import compileall
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("taskd", "aps-asyncio", "aps-uvloop", "naive")


@dataclass(frozen=True)
class Job:
    """One job as every engine gets it: fires at phase + k * interval; interval 0 = once at phase."""

    interval: float
    phase: float
    cpu: bool = False


@dataclass
class Records:
    """The runs one engine recorded: job index, its tick, when it started (epoch seconds)."""

    job: list[int]
    scheduled: list[float]
    started: list[float]

    def late(self, lo: float = float("-inf"), hi: float = float("inf")) -> list[float]:
        """Lateness of the runs whose tick is in [lo, hi), sorted."""
        return sorted(
            s - t for t, s in zip(self.scheduled, self.started, strict=True) if lo <= t < hi
        )


def pct(values: list[float], q: float) -> float:
    """The q-quantile of sorted values (nan when empty)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * q))]


class _Drain(threading.Thread):
    """Reads a process's output to the end; notes when `marker` appears."""

    def __init__(self, proc: subprocess.Popen[bytes], marker: bytes | None) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.marker = marker
        self.seen = threading.Event()
        self.tail = b""
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            self.tail = (self.tail + chunk)[-4096:]
            if self.marker and not self.seen.is_set() and self.marker in self.tail:
                self.seen.set()


@dataclass
class Running:
    """An engine's process, from spawn to stop."""

    engine: str
    proc: subprocess.Popen[bytes]
    drain: _Drain
    out: Path
    workdir: Path
    spawned: float
    ready: float = 0.0
    notify: socket.socket | None = None
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        """CPU seconds the process has used (user + system)."""
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def wait_notify(self, want: bytes, timeout: float) -> float:
        """Time at which the daemon sent a datagram containing `want` (READY=1, RELOADING=1)."""
        assert self.notify is not None
        deadline = time.time() + timeout
        while (left := deadline - time.time()) > 0:
            self.notify.settimeout(min(left, 0.5))
            try:
                msg = self.notify.recv(4096)
            except TimeoutError:
                self._check_alive()
                continue
            if want in msg.split(b"\n"):
                return time.time()
        raise RuntimeError(f"{self.engine}: no {want.decode()} within {timeout:.0f} s")

    def wait_ready(self, timeout: float = 120.0) -> None:
        if self.notify is not None:
            self.ready = self.wait_notify(b"READY=1", timeout)
            return
        deadline = time.time() + timeout
        while not self.drain.seen.wait(0.2):
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"{self.engine}: not ready within {timeout:.0f} s")
        self.ready = time.time()

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.drain.join(2)
            raise RuntimeError(
                f"{self.engine} exited with {self.proc.returncode}:\n"
                + self.drain.tail.decode(errors="replace")
            )

    def stop(self) -> Records:
        """SIGTERM, wait, and read what it recorded."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.drain.join(5)
            if self.notify is not None:
                self.notify.close()
        try:
            data = json.loads(self.out.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"{self.engine} recorded nothing ({exc}); its output ended with:\n"
                + self.drain.tail.decode(errors="replace")
            ) from None
        return Records(data["job"], data["scheduled"], data["started"])

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.notify is not None:
            self.notify.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def compile_tree(tree: Path | str) -> None:
    """Write the tree's .pyc files, as installing taskd does. A checkout run with
    PYTHONDONTWRITEBYTECODE=1 (as on the bench machine) would otherwise compile all of taskd on every
    start, about 0.06 s of CPU that an installed daemon does not pay and that APScheduler,
    installed by pip with its .pyc, does not pay either."""
    compileall.compile_dir(Path(tree) / "taskd", quiet=1)


def supports_offset(tree: Path) -> bool:
    """Does this tree's `taskd check` accept `offset` on an `every` job (issue 9)?

    Run, like the daemon, in a temp dir: `python -m` puts the working directory first on
    sys.path, so from a checkout it would import that checkout's taskd, not the tree's."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as d:
        where = subprocess.run(
            [sys.executable, "-c", "import taskd; print(taskd.__file__)"],
            env=env,
            cwd=d,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not Path(where).resolve().is_relative_to(tree):
            raise SystemExit(f"--tree {tree}: Python imports taskd from {where} instead")
        _write_config(Path(d), [Job(1.0, 0.25)], offset=True)
        r = subprocess.run(
            [sys.executable, "-m", "taskd", "check", "--config", str(Path(d) / "taskd.toml")],
            env=env,
            cwd=d,
            capture_output=True,
        )
    return r.returncode == 0


def taskd_intervals(jobs: list[Job], offset: bool) -> list[tuple[float, float]]:
    """(interval, phase) each job really gets in taskd. Without `offset` (main before issue 9)
    every `every` job is anchored to the epoch, so all jobs of one interval fire together;
    to spread them anyway, job i gets interval * (1 + i * 1e-6) instead: epoch-anchored
    intervals that differ by microseconds put the jobs' ticks at quasi-random points of the
    interval (like uniform random phases, drifting by i microseconds per tick), at the same
    rate within 0.1%."""
    if offset:
        return [(j.interval, j.phase) for j in jobs]
    return [
        (j.interval * (1 + i * 1e-6), 0.0) if j.interval else (0.0, j.phase)
        for i, j in enumerate(jobs)
    ]


def _ms(seconds: float) -> str:
    return f'"{seconds * 1000:.6f}ms"'


def _write_config(folder: Path, jobs: list[Job], offset: bool, spread: bool = True) -> Path:
    (folder / "plugins.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "compare_dropin.py", folder / "plugins.d" / "benchjobs.py")
    lines = [
        "[daemon]",
        'plugin_dirs = ["plugins.d"]',
        'state_dir = "state"',
        'runtime_dir = "run"',
        'log_format = "json"',
        "entry_points = false",
    ]
    layout = taskd_intervals(jobs, offset) if spread else [(j.interval, j.phase) for j in jobs]
    for i, (job, (interval, phase)) in enumerate(zip(jobs, layout, strict=True)):
        kind = "bench_cpu" if job.cpu else "bench_record"
        lines += [f"[jobs.j{i}]", f'type = "{kind}"']
        if interval:
            lines.append(f"every = {_ms(interval)}")
            if offset and phase:
                lines.append(f"offset = {_ms(phase)}")
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(phase))
            lines.append(f"at = {stamp}.{round(phase % 1 * 1e6):06d}Z")
    path = folder / "taskd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _ready(run: Running) -> Running:
    try:
        run.wait_ready()
    except BaseException:
        run.cleanup()
        raise
    return run


def start_taskd(jobs: list[Job], tree: Path, offset: bool, spread: bool = True) -> Running:
    """The real daemon, default config but for the paths: state on disk in a temp dir.
    spread=False keeps every `every` job on the epoch grid even without `offset`."""
    workdir = Path(tempfile.mkdtemp(prefix="taskd-compare-"))
    config = _write_config(workdir, jobs, offset, spread)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    out = workdir / "records.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
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
    return _ready(Running("taskd", proc, _Drain(proc, None), out, workdir, spawned, notify=notify))


def start_worker(engine: str, jobs: list[Job]) -> Running:
    """APScheduler (aps-asyncio, aps-uvloop) or the naive floor, in compare_workers.py."""
    workdir = Path(tempfile.mkdtemp(prefix="taskd-compare-"))
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"jobs": [[j.interval, j.phase] for j in jobs]}))
    out = workdir / "records.json"
    spawned = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "compare_workers.py"), engine, str(spec), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    return _ready(Running(engine, proc, _Drain(proc, b"BENCH-READY\n"), out, workdir, spawned))


def start(engine: str, jobs: list[Job], tree: Path, offset: bool, spread: bool = True) -> Running:
    if engine == "taskd":
        return start_taskd(jobs, tree, offset, spread)
    return start_worker(engine, jobs)
