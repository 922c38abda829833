"""Bundled taskd plugin: ``system_health``, psutil figures checked against thresholds.

A drop-in file: the daemon loads it by path. The job is ``kind="blocking"`` because psutil's
calls are plain system calls that may block on a slow mount, so they belong in the thread pool,
not on the event loop.
"""

import math
import os
from typing import Any

import psutil

import taskd


class ThresholdExceeded(RuntimeError):
    """One or more figures crossed their thresholds; ``crossed`` names each, ``figures`` has all."""

    def __init__(self, crossed: list[str], figures: dict[str, Any]) -> None:
        super().__init__(
            f"system_health: {len(crossed)} threshold(s) crossed: " + "; ".join(crossed)
        )
        self.crossed = crossed
        self.figures = figures

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call __init__ with the message only; keep it re-creatable.
        return (type(self), (self.crossed, self.figures))


def _check_threshold(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    # bool is an int, and TOML `true` would otherwise pass as the threshold 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"system_health: option {name!r} must be a number, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"system_health: option {name!r} must be >= 0, got {value!r}")
    return float(value)


def system_health(
    paths: list[str] = ["/"],  # noqa: B006 - never mutated; a literal default documents itself
    disk_percent: float | None = 90.0,
    memory_percent: float | None = 90.0,
    swap_percent: float | None = None,
    load_per_cpu: float | None = None,
    count_processes: bool = False,
) -> dict[str, Any]:
    """Check disk, memory, swap and load with psutil; fail when a threshold is exceeded.

    Options:
      paths: filesystems to report, by any path on them (default ["/"]); a missing path fails.
      disk_percent: fail when a path's disk usage exceeds this percent (default 90; 100 = off).
      memory_percent: fail when used memory exceeds this percent (default 90; 100 = off).
      swap_percent: fail when used swap exceeds this percent (default: off).
      load_per_cpu: fail when the 5-minute load average divided by the number of logical CPUs
        exceeds this (default: off).
      count_processes: also report the number of processes (default false).

    Returns the figures. Every threshold crossed is listed in the error, not just the first.
    """
    limits = {
        "disk_percent": _check_threshold("disk_percent", disk_percent),
        "memory_percent": _check_threshold("memory_percent", memory_percent),
        "swap_percent": _check_threshold("swap_percent", swap_percent),
        "load_per_cpu": _check_threshold("load_per_cpu", load_per_cpu),
    }
    # Check every path before measuring anything, so one error names all the bad ones.
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"system_health: path(s) in option 'paths' do not exist: {', '.join(missing)}"
        )

    crossed: list[str] = []

    def check(label: str, value: float, limit_name: str, unit: str = "") -> None:
        limit = limits[limit_name]
        # Strictly above: 100 can never be exceeded, so it switches a percent threshold off
        # (TOML has no null to write instead).
        if limit is not None and value > limit:
            crossed.append(f"{label} {value:g}{unit} > {limit_name} {limit:g}{unit}")

    disks: dict[str, dict[str, float | int]] = {}
    for path in paths:
        usage = psutil.disk_usage(path)
        disks[path] = {
            "percent": usage.percent,
            "used": usage.used,
            "free": usage.free,
            "total": usage.total,
        }
        check(f"disk {path}", usage.percent, "disk_percent", "%")

    memory = psutil.virtual_memory()
    check("memory", memory.percent, "memory_percent", "%")
    swap = psutil.swap_memory()
    check("swap", swap.percent, "swap_percent", "%")

    # os.cpu_count() may be None on exotic platforms; one CPU is the safe divisor there.
    cpus = psutil.cpu_count(logical=True) or 1
    load1, load5, load15 = psutil.getloadavg()
    per_cpu = {
        "1m": round(load1 / cpus, 3),
        "5m": round(load5 / cpus, 3),
        "15m": round(load15 / cpus, 3),
    }
    # The 5-minute figure: the 1-minute one trips on every short burst, the 15-minute one
    # reacts too late to be worth an alert.
    check("5-minute load per CPU", per_cpu["5m"], "load_per_cpu")

    figures: dict[str, Any] = {
        "disk": disks,
        "memory": {
            "percent": memory.percent,
            "available": memory.available,
            "total": memory.total,
        },
        "swap": {"percent": swap.percent, "used": swap.used, "total": swap.total},
        "load": {"1m": load1, "5m": load5, "15m": load15},
        "load_per_cpu": per_cpu,
        "cpus": cpus,
    }
    if count_processes:
        figures["processes"] = len(psutil.pids())

    if crossed:
        raise ThresholdExceeded(crossed, figures)
    return figures


@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [taskd.JobType("system_health", system_health, kind="blocking")]
