"""The cost of the trust checks (taskd.trust): scanning a plugin folder, loading a config.

    .venv/bin/python bench/trust_scan.py [--files 10 200 500] [--repeat 7]

A folder of N small plugin files eight folders deep in a fresh temporary folder:
taskd.plugin.dropin.scan (each file judged along its path, then opened and compared with
what was judged, then read), and load_config of a config naming no plugin folder (its path
judged, the file opened and parsed in the parser process). Medians of --repeat runs. To
compare with another version, run it with PYTHONPATH pointing at that version's tree.
Prints one table; asserts nothing."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from taskd.config import load_config
from taskd.plugin import dropin


def median_ms(func: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[10, 200, 500])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"taskd from {Path(dropin.__file__).parents[2]}")
    print(f"{'plugin files':>12} {'scan (ms)':>10} {'load_config (ms)':>17}")
    for n in args.files:
        base = Path(tempfile.mkdtemp())
        try:
            folder = base.joinpath(*"abcdefgh")
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"p{i}.py").write_text("X = 1\n" * 50)
            config = base / "taskd.toml"
            config.write_text("[daemon]\nplugin_dirs = []\n")
            scan = median_ms(lambda f=folder: dropin.scan((f,)), args.repeat)
            load = median_ms(lambda c=config: load_config(c), args.repeat)
            print(f"{n:>12} {scan:>10.1f} {load:>17.1f}")
        finally:
            shutil.rmtree(base)


if __name__ == "__main__":
    main()
