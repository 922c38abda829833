"""Config shapes: how long does parsing take on each, and how much memory?

    .venv/bin/python bench/config_parse.py [--shapes dotted-39KB,...] [--cap-mib 3072]

Three tables; asserts nothing.

1. `taskd check` on hostile shapes: each is written to a temp file and checked by a fresh
   `python -m taskd check` process; its exit code, wall time and peak RSS of the process tree
   (the parser child included; sampled every 10 ms from /proc). A run past --timeout seconds
   or --cap-mib MiB is killed ("KILLED"), so an unbounded parser cannot take the machine down.
2. read_toml alone on valid files of about 1 MiB (the size cap) of many shapes, each in a
   fresh process: wall and CPU seconds and the parser child's peak RSS. These set the
   parser's CPU and memory limits (taskd.config.source).
3. The cost of the separate process: read_toml against tomllib in-process, median of 20."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PLUGIN = "[daemon]\nentry_points = false\n"


def _dotted(n: int) -> str:
    return PLUGIN + ".".join(["a"] * n) + " = 1\n"


SHAPES: dict[str, Callable[[], str]] = {
    # the file: one dotted key of 39 KB
    "dotted-39KB": lambda: _dotted(19_500),
    "dotted-10KB": lambda: _dotted(5_000),
    "dotted-header-39KB": lambda: PLUGIN + "[" + ".".join(["a"] * 19_500) + "]\n",
    "dotted-in-options": lambda: (
        PLUGIN
        + '[jobs.x]\ntype = "t"\nevery = "1h"\n[jobs.x.options]\n'
        + ".".join(["a"] * 2_000)
        + " = 1\n"
    ),
    "nested-arrays-1M": lambda: PLUGIN + "a = " + "[" * 500_000 + "]" * 500_000 + "\n",
    "nested-inline-tables": lambda: PLUGIN + "a = " + "{b=" * 100_000 + "1" + "}" * 100_000 + "\n",
    "many-tables": lambda: PLUGIN + "".join(f"[t{i}]\n" for i in range(400_000)),
    "many-keys": lambda: PLUGIN + "[t]\n" + "".join(f"k{i} = {i}\n" for i in range(300_000)),
    "dotted-1MiB": lambda: _dotted(520_000),
    "huge-string": lambda: PLUGIN + 'a = "' + "x" * (4 * 1024 * 1024 - 100) + '"\n',
    "multiline-string": lambda: (
        PLUGIN + 'a = """\n' + "x" * 70 + "\n" * 0 + ("y" * 70 + "\n") * 55_000 + '"""\n'
    ),
    "just-large-comments": lambda: PLUGIN + ("# " + "c" * 70 + "\n") * 57_000,
    "array-of-tables": lambda: PLUGIN + "[[t]]\n" * 600_000,
    "big-array": lambda: PLUGIN + "a = [" + "1," * 2_000_000 + "]\n",
    "header-in-string-300KB": lambda: PLUGIN + 's = """\n\\"""\n[a' + " " * 300_000 + 'x\n"""\n',
}


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_rss(pid: int) -> int:
    """RSS of ``pid`` plus its children (a parser child process counts too)."""
    total = _rss(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(_rss(int(c)) for c in children)


def measure(args: list[str], timeout: float, cap: int) -> tuple[str, float, int, str]:
    with tempfile.TemporaryFile("w+") as sink:
        began = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskd", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        peak, killed = 0, False
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            if peak > cap or time.monotonic() - began > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                proc.wait()
                break
            time.sleep(0.01)
        took = time.monotonic() - began
        sink.seek(0)
        out = sink.read()
    code = "KILLED" if killed else str(proc.returncode)
    last = (out.strip().splitlines() or [""])[-1]
    return code, took, peak, last


_ONE_MIB = 1024 * 1024 - 200


def _upto(text: str, sep: str = "\n") -> str:
    """``text`` cut at the last ``sep`` before about 1 MiB."""
    return text[:_ONE_MIB].rsplit(sep, 1)[0] + "\n"


def _fill(unit: str) -> str:
    return unit * (_ONE_MIB // len(unit))


def _jobs(n: int) -> str:
    return "".join(f'[jobs.j{i}]\ntype = "t"\nevery = "{i % 60 + 1}m"\n' for i in range(n))


VALID: dict[str, Callable[[], str]] = {
    "10,000 jobs": lambda: _jobs(10_000),
    "27,000 jobs": lambda: _upto(_jobs(28_000), "[jobs"),
    "many tables": lambda: _upto("".join(f"[t{i}]\n" for i in range(200_000))),
    "many keys": lambda: _upto("".join(f"k{i} = {i}\n" for i in range(200_000))),
    "array of tables": lambda: _fill("[[t]]\n"),
    "big array": lambda: "a = [" + _fill("1,")[:-10] + "]\n",
    "array of inline tables": lambda: "a = [" + _fill("{},")[:-10] + "]\n",
    "2-part dotted keys": lambda: _upto("".join(f"a{i}.b = 1\n" for i in range(200_000))),
    "31-part dotted keys": lambda: _upto(
        "".join(f"k{i}." + ".".join(["a"] * 30) + " = 1\n" for i in range(20_000))
    ),
    "header-like line in string": lambda: 's = """\n\\"""\n[a' + " " * (_ONE_MIB - 30) + 'x\n"""\n',
}

_PARSE_ONE = """
import resource, sys, time
from pathlib import Path
from taskd.config.source import read_toml
from taskd.errors import ConfigError
t, c = time.perf_counter(), time.process_time()
try:
    read_toml(Path(sys.argv[1])); result = "ok"
except ConfigError as exc:
    result = str(exc).split(": ", 1)[1][:60]
ch = resource.getrusage(resource.RUSAGE_CHILDREN)
print(time.perf_counter() - t, time.process_time() - c + ch.ru_utime + ch.ru_stime,
      ch.ru_maxrss, "|", result)
"""

_OVERHEAD = """
import statistics, sys, time, tomllib
from pathlib import Path
from taskd.config.source import read_toml
path = Path(sys.argv[1])
def median(f):
    times = []
    for _ in range(20):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return statistics.median(times)
print(median(lambda: read_toml(path)), median(lambda: tomllib.loads(path.read_text())))
"""


def parse_step(tmp: str) -> None:
    print(
        f"\n{'valid ~1 MiB shape':28} {'bytes':>9} {'wall s':>7} {'CPU s':>6} {'child MiB':>9}  result"
    )
    for name, make in VALID.items():
        path = Path(tmp, "valid.toml")
        path.write_text(make())
        out = subprocess.run(
            [sys.executable, "-c", _PARSE_ONE, str(path)], capture_output=True, text=True
        ).stdout
        figures, _, result = out.partition("|")
        wall, cpu, peak = (float(x) for x in figures.split())
        print(
            f"{name:28} {path.stat().st_size:>9} {wall:7.2f} {cpu:6.2f} {peak / 1024:9.1f}  {result.strip()}"
        )


def overhead(tmp: str) -> None:
    print(f"\n{'parse cost (median of 20)':28} {'bytes':>9} {'read_toml':>10} {'in-process':>11}")
    for name, text in (("minimal", PLUGIN), ("10,000 jobs", PLUGIN + _jobs(10_000))):
        path = Path(tmp, "cost.toml")
        path.write_text(text)
        out = subprocess.run(
            [sys.executable, "-c", _OVERHEAD, str(path)], capture_output=True, text=True
        ).stdout
        child, inproc = (float(x) for x in out.split())
        print(f"{name:28} {path.stat().st_size:>9} {child * 1000:8.1f}ms {inproc * 1000:9.1f}ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--cap-mib", type=int, default=3072)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--only-check", action="store_true", help="table 1 only (any version)")
    ns = parser.parse_args()
    cap = ns.cap_mib << 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp, "good.toml")
        good.write_text(
            PLUGIN
            + "".join(f'[jobs.j{i}]\ntype = "t"\nevery = "{i % 60 + 1}m"\n' for i in range(10_000))
        )
        base = Path(tmp, "minimal.toml")
        base.write_text(PLUGIN)
        cases = [("minimal (baseline)", base), ("10,000 jobs (legit)", good)]
        for name in ns.shapes.split(","):
            path = Path(tmp, f"{name}.toml")
            path.write_text(SHAPES[name]())
            cases.append((name, path))
        for name, path in cases:
            code, took, peak, last = measure(["check", "-c", str(path)], ns.timeout, cap)
            rows.append((name, path.stat().st_size, code, took, peak, last))
            print(
                f"{name:24} {path.stat().st_size:>9} B  rc {code:>6}  {took:6.2f} s  "
                f"{peak / 2**20:7.1f} MiB  {last[:110]}",
                flush=True,
            )
        if not ns.only_check:
            parse_step(tmp)
            overhead(tmp)


if __name__ == "__main__":
    main()
