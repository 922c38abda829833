"""Loop lag, measured while the loop works, and a blocked loop named: the job, the run and
the line.

Two parts, so a healthy loop pays next to nothing and an idle one nothing at all:

- a probe: one ``loop.call_later(interval)`` timer that records how late it ran (the loop lag)
  and re-arms itself while the loop has work (``busy``: runs in flight, or the loop thread
  used CPU since the last probe). When the loop is idle it parks; whatever starts work arms
  it again (``poke``: a request, a signal; ``beat``: the scheduler's own timer, whose lateness
  is a lag sample too). A loop that waits in epoll cannot be blocked, so parking loses
  nothing: an idle daemon wakes only when something is due (it was 8 times a second);
- a watchdog thread that sleeps until the probe, if it has not run by then, would be
  overdue by the threshold: the first moment the loop can count as blocked. It then compares
  the clock with the time the probe is due; while the loop turns, that is one subtraction
  per probe or two, not a poll (a poll at a quarter of the threshold was 16 wake-ups a second,
  most of an idle daemon's CPU). While the probe is parked it sleeps without a deadline.

When the probe is overdue by more than the threshold, the watchdog logs ``loop_blocked`` once
for that episode, naming the task the loop is running (and so the job and run id) and the
line the loop thread is executing. The probe logs ``loop_unblocked`` when it runs again.

The watchdog needs the GIL to look: code that holds it without a break (a long C call) is
reported when it lets go, if the loop has not turned by then."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from taskd.observe.culprit import Skip, current_task, where

log = structlog.get_logger("taskd.loopwatch")

# Upper bounds in seconds, Prometheus style (a lag equal to a bound counts in its bucket).
LAG_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
WINDOW = 10.0  # seconds per slot of the rolling maximum
WINDOWS = 6  # slots kept: lag_max covers the last 50 to 60 seconds
# The loop thread's CPU time between two probes above which the loop counts as working (the
# probe and an empty loop iteration take tens of microseconds): 0.4% of a core at 250 ms.
IDLE_CPU = 0.001
MIN_WAKE = 0.01  # the watchdog never wakes more often than this, whatever the threshold
JOIN_TIMEOUT = 1.0


@dataclass(slots=True)
class _Episode:
    """One blocking episode, from the watchdog noticing it to the probe running again."""

    due: float  # when the probe should have run (monotonic)
    job: str | None
    run_id: str | None


class LoopWatch:
    """Measures the loop's lag and reports a loop blocked longer than ``threshold`` seconds.

    ``run_ids(job)`` returns the ids of that job's runs in flight; it is called from the
    watchdog thread (while the loop is stuck), and only when a ``taskd-job:`` task blocks.

    Read by the metrics and the status page, from the loop:

    - ``lag``: the last probe's lag in seconds; ``lag_max``: the largest in the last minute;
    - ``heartbeat``: ``time.monotonic()`` when the probe last ran;
    - ``lag_buckets``, ``lag_counts``, ``lag_sum``, ``lag_count``: a histogram of every probe's
      lag. ``lag_counts`` is per bucket, not cumulative, with one more entry than
      ``lag_buckets`` for lags above the last bound; :meth:`lag_histogram` gives the
      cumulative form Prometheus wants;
    - ``blocked_total``: blocking episodes reported since start.

    ``threshold`` may be changed while running (a reload); the watchdog reads it each time."""

    def __init__(
        self, threshold: float, run_ids: Callable[[str], list[str]], *, interval: float = 0.25
    ) -> None:
        if not threshold > 0 or not interval > 0:
            raise ValueError(
                f"threshold and interval must be more than 0, got {threshold!r}, {interval!r}"
            )
        # Set before threshold: its setter wakes the watchdog to sleep for the new value.
        self._wake = threading.Event()
        self.threshold = threshold
        self.interval = interval
        self._run_ids = run_ids
        # Which files are plugins' (the daemon sets it: drop-in folders, entry-point modules):
        # their frames name the culprit first, and only they count as plugin code. Unset, any
        # code outside the standard library, uvloop and taskd counts. Read from the thread.
        self.is_plugin_file: Callable[[str], bool] | None = None
        self.lag = 0.0
        self.heartbeat = time.monotonic()
        self.lag_buckets = LAG_BUCKETS
        self.lag_counts: list[int] = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0
        self.lag_count = 0
        self.blocked_total = 0
        self._max_slot = [0] * WINDOWS  # which WINDOW-long slot each entry of _max_lag is for
        self._max_lag = [0.0] * WINDOWS
        # When the probe should next run; infinity while not started, so nothing is overdue.
        # Written by the probe and read by the watchdog under _lock, with _episode.
        self._due = math.inf
        self._lock = threading.Lock()
        self._episode: _Episode | None = None
        self._last_change: float | None = None  # when an episode last began or ended
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._failed = False
        self._skip: Skip | None = None
        # Whether the loop has work (the daemon sets it: runs in flight). Unset, the probe
        # runs every interval for ever; set, it parks while the loop is idle, and poke() or
        # beat() (work starting) arms it again. Called on the loop.
        self.busy: Callable[[], bool] | None = None
        self._cpu = 0.0  # the loop thread's CPU time at the last probe (time.thread_time)
        self.pokes = 0  # times the probe was armed from parked; for tests and the curious
        self.parks = 0  # times it parked

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, seconds: float) -> None:
        # A reload may lower it: the watchdog's sleep was worked out for the old value.
        self._threshold = seconds
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the probe and the watchdog thread. Call it from the loop's own thread (the
        thread whose stack a report shows), with the loop running or about to run."""
        if self._thread is not None:
            raise RuntimeError("LoopWatch is already started")
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._skip = Skip()
        self._stopped = threading.Event()
        now = time.monotonic()
        with self._lock:
            self._due = now + self.interval
        self.heartbeat = now
        self._cpu = time.thread_time()
        self._handle = loop.call_later(self.interval, self._probe)
        self._thread = threading.Thread(target=self._watch, name="taskd-loopwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the probe and the thread, promptly; safe to call twice. Call it from the loop's
        thread (a timer handle is not to be cancelled from another)."""
        self._stopped.set()
        self._wake.set()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
        with self._lock:
            self._due = math.inf
            episode, self._episode = self._episode, None
        if episode is not None:  # stopped before the probe ran again
            now = time.monotonic()
            self._unblocked(episode, max(now - episode.due, 0.0), now)

    # -- reading -----------------------------------------------------------------------------

    @property
    def lag_max(self) -> float:
        """The largest lag the probe measured in the last 50 to 60 seconds."""
        slot = int(time.monotonic() // WINDOW)
        return max(
            (
                lag
                for s, lag in zip(self._max_slot, self._max_lag, strict=True)
                if slot - s < WINDOWS
            ),
            default=0.0,
        )

    @property
    def blocked(self) -> bool:
        """A blocking episode has been reported and the loop has not turned since."""
        return self._episode is not None

    def blocked_recently(self, seconds: float) -> bool:
        """The loop is blocked, or a blocking episode began or ended in the last ``seconds``."""
        if self._episode is not None:
            return True
        last = self._last_change
        return last is not None and time.monotonic() - last <= seconds

    def lag_histogram(self) -> list[tuple[float, int]]:
        """Cumulative ``(upper bound, count)`` pairs, the last one ``(inf, lag_count)``."""
        pairs: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip((*self.lag_buckets, math.inf), self.lag_counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs

    # -- the probe, on the loop --------------------------------------------------------------

    def poke(self) -> None:
        """Work is starting on the loop (a tick fired, a request or a signal came): arm the
        probe if it is parked. Call it from the loop's thread; next to free when armed."""
        if self._handle is not None or self._loop is None or self._stopped.is_set():
            return
        now = time.monotonic()
        with self._lock:
            self._due = now + self.interval
        self._cpu = time.thread_time()
        self._handle = self._loop.call_later(self.interval, self._probe)
        self.pokes += 1
        self._wake.set()  # the watchdog sleeps without a deadline while the probe is parked

    def beat(self, lag: float) -> None:
        """A timer that fires anyway (the scheduler's) ran ``lag`` seconds after its time.
        On a parked probe it is the lag sample (one that costs no wake-up of its own) and
        the start of work, so it arms the probe; on an armed one the probe measures, and a
        beat costs one test (it comes with every tick)."""
        if self._handle is None:
            self._record(max(lag, 0.0), time.monotonic())
            self.poke()

    def _probe(self) -> None:
        now = time.monotonic()
        working = self._working()
        with self._lock:
            # A timer may fire a hair early (clock resolution); early is not negative lag.
            lag = max(now - self._due, 0.0)
            self._due = now + self.interval if working else math.inf
            episode, self._episode = self._episode, None
        self._record(lag, now)
        if episode is not None:
            self._unblocked(episode, lag, now)
        if working and not self._stopped.is_set() and self._loop is not None:
            self._handle = self._loop.call_later(self.interval, self._probe)
        else:
            self._handle = None
            self.parks += 1

    def _working(self) -> bool:
        """Whether the loop has work, so the probe stays armed: without ``busy``, always;
        else while ``busy()`` says so (runs in flight) or the loop thread used more than
        IDLE_CPU since the last probe (work taskd was not told of: a plugin's own task)."""
        busy = self.busy
        if busy is None:
            return True
        cpu = time.thread_time()
        used, self._cpu = cpu - self._cpu, cpu
        return used > IDLE_CPU or busy()

    def _record(self, lag: float, now: float) -> None:
        self.lag = lag
        self.heartbeat = now
        self.lag_sum += lag
        self.lag_count += 1
        self.lag_counts[bisect.bisect_left(self.lag_buckets, lag)] += 1
        slot = int(now // WINDOW)
        i = slot % WINDOWS
        if self._max_slot[i] != slot:
            self._max_slot[i] = slot
            self._max_lag[i] = lag
        elif lag > self._max_lag[i]:
            self._max_lag[i] = lag

    def _unblocked(self, episode: _Episode, blocked_for: float, now: float) -> None:
        self._last_change = now
        log.info(
            "loop_unblocked",
            blocked_for=round(blocked_for, 3),
            job=episode.job,
            run_id=episode.run_id,
        )

    # -- the watchdog thread -----------------------------------------------------------------

    def _watch(self) -> None:
        stopped, wake = self._stopped, self._wake
        while not stopped.is_set():
            wake.wait(self._sleep_for())
            wake.clear()
            if stopped.is_set():
                return
            try:
                self._check()
            except Exception as exc:
                # A diagnostic must never take the daemon down or flood its log: say it once.
                if not self._failed:
                    self._failed = True
                    with contextlib.suppress(Exception):
                        log.error("loopwatch_failed", error=repr(exc))

    def _sleep_for(self) -> float | None:
        """Seconds until the loop can first count as blocked: the probe's due time plus the
        threshold. While an episode is reported nothing can be reported before the probe runs
        again and is then overdue in turn, an interval plus the threshold later at the
        earliest. While the probe is parked (or not started), None: no deadline, the loop is
        idle, and whatever arms the probe (poke, stop, a new threshold) wakes the thread."""
        with self._lock:
            due, episode = self._due, self._episode
        threshold = self.threshold
        if episode is not None:
            return self.interval + threshold
        if due == math.inf:
            return None
        return max(due + threshold - time.monotonic(), MIN_WAKE)

    def _check(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return  # a loop that is not running is not blocked
        now = time.monotonic()
        with self._lock:
            overdue = now - self._due
            if self._episode is not None or overdue <= self.threshold:
                return
            # Looked at and logged under the lock: the probe, which takes it too, cannot then
            # log loop_unblocked before this episode's loop_blocked line.
            task = current_task(loop)
            name = task.get_name() if task is not None else None
            frame, stack, plugin_code = where(
                self._loop_thread, self.is_plugin_file, self._skip or Skip()
            )
            # No plugin frame on the loop thread: the time went to taskd itself or to threads
            # holding the GIL (CPU-heavy blocking jobs). The task that happened to be current
            # did not block anything; blaming it would send the operator to the wrong job.
            job, run_id = self._owner(name) if plugin_code else (None, None)
            self._episode = _Episode(self._due, job, run_id)
            self._last_change = now
            self.blocked_total += 1
            log.warning(
                "loop_blocked",
                blocked_for=round(overdue, 3),
                job=job,
                run_id=run_id,
                frame=frame,
                stack=stack,
                task=name,
                threshold=self.threshold,
                **(
                    {}
                    if plugin_code
                    else {
                        "note": "no plugin code was running on the loop: taskd itself, or "
                        "threads holding the GIL (CPU-heavy blocking jobs)"
                    }
                ),
            )

    def _owner(self, task_name: str | None) -> tuple[str | None, str | None]:
        """(job, run id) from a task name the scheduler gave (taskd.schedule.job)."""
        if task_name is None:
            return None, None
        kind, _, rest = task_name.partition(":")
        if kind == "taskd-run":  # taskd-run:<job>:<run id>; neither part has a colon
            job, _, run_id = rest.partition(":")
            return job or None, run_id or None
        if kind == "taskd-job":  # the job's own task, which runs its inline runs
            try:
                ids = list(self._run_ids(rest))
            except Exception:  # the job table may be mid-change: the job name still helps
                ids = []
            return rest, ",".join(ids) or None
        return None, None
