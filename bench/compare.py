"""taskd against APScheduler 3.11 and the naive floor, side by side in one invocation.

    .venv/bin/pip install -e '.[bench]'      # APScheduler 3.11, a bench-only extra
    .venv/bin/python bench/compare.py [--repeat 3] [--cases spread,burst3k,...] [--quick]
                                      [--tree PATH] [--json FILE]

Engines, each in a fresh process per measurement, interleaved within each repeat:
- taskd: the real daemon, `python -m taskd run` from --tree (default: this checkout) with its
  default config (uvloop, state on disk in a temp dir, JSON log to a pipe this bench drains),
  running bench/compare_dropin.py's io job, which records its own lateness;
- APScheduler 3.11's AsyncIOScheduler on asyncio and on uvloop, the same job, in-memory store,
  default job settings (bench/compare_workers.py);
- the naive floor: one asyncio Task per job sleeping to its next tick, on uvloop.
Cases (issue 9's table): spread, burst3k, burst10k, maxrate, idle10k, sighup10k (taskd only),
cpu (taskd's cpu jobs against a bare ProcessPoolExecutor). Prints one Markdown table: the
median and min-max of each figure, taskd/APS ratios of the medians, the floor, and the load
average at start and end. Asserts nothing."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

from compare_cases import CASES, Case, Settings
from compare_proc import ROOT, compile_tree, supports_offset

COLUMNS = (("taskd", "taskd"), ("aps-asyncio", "APS asyncio"), ("aps-uvloop", "APS uvloop"))
NO_RATIO = {"ran_pct", "lost", "doubled"}  # checks, not figures to compare
Results = dict[str, dict[str, list[dict[str, float]]]]


def _need_apscheduler() -> None:
    try:
        import apscheduler
    except ImportError:
        sys.exit(
            "bench/compare.py needs APScheduler 3.11 (a bench-only extra):\n"
            f"    {sys.executable} -m pip install -e '{ROOT}[bench]'\n"
            "or: pip install 'apscheduler>=3.11,<4'"
        )
    major, minor = (int(x) for x in apscheduler.__version__.split(".")[:2])
    if (major, minor) < (3, 11) or major >= 4:
        sys.exit(
            f"bench/compare.py compares against APScheduler 3.11+ (3.x); found {apscheduler.__version__}"
        )


def _num(v: float) -> str:
    if v != v:  # nan: nothing measured
        return "-"
    a = abs(v)
    if a >= 100 or v == int(v):
        return f"{v:,.0f}"
    return f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def _values(results: Results, case: str, engine: str, key: str) -> list[float]:
    return [r[key] for r in results.get(case, {}).get(engine, []) if key in r]


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    med = _num(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({_num(min(values))}-{_num(max(values))})"


def _ratio(results: Results, case: Case, key: str) -> str:
    taskd = _values(results, case.name, "taskd", key)
    if not taskd or key in NO_RATIO:
        return ""
    t = statistics.median(taskd)
    parts = []
    refs = [e for e in ("aps-asyncio", "aps-uvloop") if e in case.engines]
    for ref in refs or ["naive"]:
        vals = _values(results, case.name, ref, key)
        if vals and statistics.median(vals):
            parts.append(f"{t / statistics.median(vals):.2f}x")
    return " / ".join(parts) + (" floor" if parts and not refs else "")


def table(results: Results, cases: list[Case]) -> list[str]:
    head = [
        "figure",
        *(label for _, label in COLUMNS),
        "taskd/APS (asyncio / uvloop)",
        "naive floor",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        for key, label in case.figures:
            cells = [_cell(_values(results, case.name, e, key)) for e, _ in COLUMNS]
            floor = _cell(_values(results, case.name, "naive", key))
            lines.append(
                "| " + " | ".join([label, *cells, _ratio(results, case, key), floor]) + " |"
            )
    return lines


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so each case's `finally` stops the engine it started


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds, engines interleaved in each")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="shorter windows: a smoke run")
    parser.add_argument("--tree", type=Path, default=ROOT, help="run taskd from this source tree")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    known = {c.name: c for c in CASES}
    wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
    if unknown := [n for n in wanted if n not in known]:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    cases = [known[n] for n in wanted]
    if any(e.startswith("aps") for c in cases for e in c.engines):
        _need_apscheduler()
    tree = args.tree.resolve()
    compile_tree(tree)
    s = Settings(tree=tree, offset=supports_offset(tree), quick=args.quick)
    load_start = os.getloadavg()
    began = time.time()
    results: Results = {}
    errors: list[str] = []
    for rnd in range(args.repeat):
        for case in cases:
            for engine in case.engines:
                t = time.time()
                try:
                    figures = case.run(s, engine)
                except Exception as exc:
                    errors.append(f"round {rnd + 1} {case.name} {engine}: {exc!r}")
                    traceback.print_exc()
                    continue
                results.setdefault(case.name, {}).setdefault(engine, []).append(figures)
                shown = ", ".join(f"{k}={_num(v)}" for k, v in figures.items())
                print(
                    f"[{rnd + 1}/{args.repeat}] {case.name:<9} {engine:<11} {time.time() - t:5.1f} s  {shown}",
                    file=sys.stderr,
                )
    load_end = os.getloadavg()
    layout = (
        "explicit offset i/N"
        if s.offset
        else "no `offset` in this tree: intervals x (1 + i*1e-6), quasi-random phases"
    )
    print(
        f"taskd ({tree}) vs APScheduler 3.11 vs naive floor; median (min-max) of {args.repeat}"
        f"{', quick' if args.quick else ''}; {time.time() - began:.0f} s"
    )
    print(f"taskd spread layout: {layout}")
    print(
        f"load average (1/5/15 min): start {' '.join(f'{x:.2f}' for x in load_start)}, end {' '.join(f'{x:.2f}' for x in load_end)}"
    )
    print()
    print("\n".join(table(results, cases)))
    for e in errors:
        print(f"error: {e}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "tree": str(tree),
                    "offset": s.offset,
                    "quick": args.quick,
                    "repeat": args.repeat,
                    "load": {"start": load_start, "end": load_end},
                    "results": results,
                    "errors": errors,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
