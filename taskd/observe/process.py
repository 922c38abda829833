"""Resident memory, CPU time and open descriptors of the daemon and of its pool's workers, for
the metrics (psutil)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil


class ProcessFigures:
    """Reads (rss bytes, cpu seconds, open fds) for the daemon and summed over the workers.

    The workers' CPU is exported as a counter, which must not go down when a worker is
    replaced: the last figure seen for each worker that has since gone is kept in
    ``gone_cpu``. (CPU a worker spent between the last scrape and its exit is not seen.)"""

    def __init__(self) -> None:
        self.me = psutil.Process(os.getpid())
        # psutil.Process objects kept between scrapes: making one reads /proc again.
        self.workers: dict[int, psutil.Process] = {}
        self.worker_cpu: dict[int, float] = {}
        self.gone_cpu = 0.0

    def daemon(self) -> tuple[float, float, float]:
        p = self.me
        with p.oneshot():
            cpu = p.cpu_times()
            return float(p.memory_info().rss), cpu.user + cpu.system, float(p.num_fds())

    def pool(self, pids: Iterable[int]) -> tuple[float, float, float]:
        rss = fds = 0.0
        seen: dict[int, psutil.Process] = {}
        for pid in pids:
            p = self.workers.get(pid)
            try:
                if p is None:
                    p = psutil.Process(pid)
                with p.oneshot():
                    mem = p.memory_info().rss
                    cpu = p.cpu_times()
                    n = p.num_fds()
            except psutil.Error:  # exited since the pool listed it: counted as gone below
                continue
            seen[pid] = p
            rss += mem
            fds += n
            self.worker_cpu[pid] = cpu.user + cpu.system
        for pid in [pid for pid in self.worker_cpu if pid not in seen]:
            self.gone_cpu += self.worker_cpu.pop(pid)
        self.workers = seen
        return rss, self.gone_cpu + sum(self.worker_cpu.values()), fds
