"""Bookkeeping of the process pool: one record per run and per worker process, and each
slot's record of failed starts and deaths, which sets the back-off before its next start and
whether the pool reports itself degraded."""

from __future__ import annotations

import asyncio
import signal
from multiprocessing.process import BaseProcess
from typing import Any

import psutil
import structlog

from taskd.errors import JobTimeout, MemoryLimitExceeded

__all__ = [
    "BACKOFF_MAX",
    "DEGRADED_AFTER",
    "GIVE_UP_AFTER",
    "STABLE_AFTER",
    "Run",
    "RunState",
    "Slots",
    "StartFailedError",
    "Worker",
    "backoff",
    "check_limits",
    "describe_exit",
    "mib",
    "restart_cause",
]

log = structlog.get_logger("taskd.run.procpool")

# A slot whose worker fails to come up this many times in a row counts as unable to start;
# when every slot is in that state and none is up, queued and new runs fail instead of waiting.
GIVE_UP_AFTER = 3
# Each failed start or unexpected death in a row (a "strike") doubles the wait before the
# slot's next start, from BACKOFF_FIRST up to BACKOFF_MAX: a job that segfaults on every run,
# or something that kills every new worker, costs a few forks a minute, not five a second.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
# A worker that completes a run, or stays up this long, clears its slot's strikes.
STABLE_AFTER = 10.0
# This many strikes in a row in one slot and the pool reports itself degraded.
DEGRADED_AFTER = 3


class RunState:
    QUEUED, RUNNING, DONE = 0, 1, 2


class StartFailedError(Exception):
    """A worker process could not be started or died before it reported ready."""


class Run:
    """One call of :meth:`ProcessPool.run`, from submission to outcome."""

    __slots__ = ("frame", "fut", "label", "max_memory", "mem_timer", "state", "timeout", "timer")

    def __init__(
        self,
        frame: bytes,
        fut: asyncio.Future[Any],
        label: str,
        timeout: float | None,
        max_memory: int | None,
    ) -> None:
        self.frame = frame
        self.fut = fut
        self.label = label
        self.timeout = timeout
        self.max_memory = max_memory
        self.state = RunState.QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.mem_timer: asyncio.TimerHandle | None = None


class Worker:
    """Parent-side record of one worker process."""

    __slots__ = (
        "doomed",
        "exited",
        "expected",
        "forkserver",
        "forkserver_lost",
        "kill_reason",
        "loss_check_until",
        "pid",
        "proc",
        "ps",
        "ran",
        "ready",
        "respawn_in",
        "returncode",
        "run",
        "slot",
        "stop_timer",
        "transport",
    )

    def __init__(self, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        self.slot = slot
        self.proc: BaseProcess | None = None
        self.pid = 0
        self.transport: asyncio.Transport | None = None
        # True once the worker reported ready, False if it exited first; never an exception,
        # so nobody is left holding an unretrieved one.
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.returncode: int | None = None
        self.run: Run | None = None
        # Set once the pool has decided this worker goes (killed, told to exit, lost its
        # socket): it takes no more runs and whatever it still sends is ignored.
        self.doomed = False
        # Set when the pool itself ends the worker; any other exit is a death worth a log.
        self.expected = False
        self.kill_reason: BaseException | None = None
        self.ran = False
        self.ps: psutil.Process | None = None
        self.stop_timer: asyncio.TimerHandle | None = None
        # The forkserver that forked it (0: another start method), whether the worker was
        # lost with it, and until when to look for that (see Supervisor._collect_exit).
        self.forkserver = 0
        self.forkserver_lost = False
        self.loss_check_until = 0.0
        # Set when it died unexpectedly: how long its slot waits before starting another.
        self.respawn_in = 0.0


def check_limits(timeout: float | None, max_memory: int | None, max_pickle: int | None) -> None:
    """Refuse a run's limits that make no sense (ValueError), before it is queued."""
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if max_memory is not None and max_memory <= 0:
        raise ValueError(f"max_memory must be > 0 bytes, got {max_memory}")
    if max_pickle is not None and max_pickle <= 0:
        raise ValueError(f"max_result must be > 0 bytes, got {max_pickle}")


def restart_cause(worker: Worker) -> str:
    """Why a worker (that was up) is being replaced, for the restart counter: its run's
    timeout or memory limit; ``killed`` when taskd killed it on purpose for another reason
    (its run was cancelled, its channel was lost); ``died`` when nobody meant it to go."""
    reason = worker.kill_reason
    if isinstance(reason, JobTimeout):
        return "timeout"
    if isinstance(reason, MemoryLimitExceeded):
        return "memory"
    return "killed" if worker.expected else "died"


def backoff(strikes: int) -> float:
    """The wait before a slot's next start after ``strikes`` unexpected ends in a row."""
    return min(BACKOFF_FIRST * 2 ** (strikes - 1), BACKOFF_MAX) if strikes > 0 else 0.0


def describe_exit(code: int) -> str:
    """A worker's exit status in words, with the usual cause of a fatal signal."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = {
            "SIGKILL": " (killed from outside, or by the out-of-memory killer)",
            "SIGSEGV": " (a crash in native code)",
            "SIGBUS": " (a crash in native code)",
            "SIGABRT": " (aborted, usually by native code)",
        }.get(name, "")
        return f"was killed by signal {name}{hint}"
    return f"exited with code {code}"


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Slots:
    """Each worker slot's record: up or not, failed starts in a row (for giving up on runs),
    strikes in a row and the last one's cause (for the back-off and the degraded report)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.up = [False] * n
        self.failures = [0] * n
        self.strikes = [0] * n
        self.last = [""] * n
        self.degraded: str | None = None

    def strike(self, slot: int, what: str) -> float:
        """``slot``'s worker failed to start or died unexpectedly (``what``); return how long
        the slot waits before its next start."""
        strikes = self.strikes[slot] = self.strikes[slot] + 1
        self.last[slot] = what
        self._check_health()
        return backoff(strikes)

    def clear(self, slot: int) -> None:
        if self.strikes[slot]:
            self.strikes[slot] = 0
            self._check_health()

    def all_settled(self) -> bool:
        """Every slot is up or has given up starting."""
        return all(up or f >= GIVE_UP_AFTER for up, f in zip(self.up, self.failures, strict=True))

    def all_given_up(self) -> bool:
        return all(f >= GIVE_UP_AFTER for f in self.failures)

    def _check_health(self) -> None:
        """Report the pool degraded, or recovered, when the worst slot's record crosses
        the line; each change is logged once."""
        worst = max(range(self.n), key=self.strikes.__getitem__)
        strikes = self.strikes[worst]
        if strikes >= DEGRADED_AFTER:
            reason = (
                f"cpu worker processes keep failing ({strikes} in a row; the last: "
                f"{self.last[worst]}); each replacement waits longer, now "
                f"{backoff(strikes):g}s, at most {BACKOFF_MAX:g}s"
            )
            if self.degraded is None:
                log.warning("procpool.degraded", reason=reason)
            self.degraded = reason
        elif self.degraded is not None:
            self.degraded = None
            log.info("procpool.recovered")
