"""Work done in steps: a generator that yields between units of work (a job validated, a
job resolved) and returns its result. Run to the end at once (:func:`finish`), or by the
event loop in slices of a few milliseconds (:func:`finish_in_slices`), so that a reload of
10,000 jobs never holds the loop, or the GIL against it, for longer than one slice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")

Steps = Generator[None, None, T]

# A slice's length: runs due meanwhile start at most this much later (plus one step). Short
# against the 100 ms a reload may delay a run, long against the cost of a loop iteration.
SLICE = 0.005


def finish(steps: Steps[T]) -> T:
    """Run ``steps`` to the end; its result (or its exception)."""
    while True:
        done, result = _step(steps)
        if done:
            return result  # type: ignore[return-value]


async def finish_in_slices(steps: Steps[T], slice_seconds: float = SLICE) -> T:
    """Run ``steps`` on the running loop, letting the loop run everything that is ready
    between slices of at most ``slice_seconds`` (each slice ends at the first step past it).

    On the loop rather than in a thread: a thread's CPU work holds the GIL against the loop,
    and each time the loop gives the GIL up (any syscall) it waits up to the switch interval
    (5 ms) to get it back; a run spread over its own loop iterations then waits that long
    several times (measured: up to 131 ms late during a reload of 10,000 jobs)."""
    clock = time.perf_counter
    end = clock() + slice_seconds
    while True:
        done, result = _step(steps)
        if done:
            return result  # type: ignore[return-value]
        if clock() >= end:
            await asyncio.sleep(0)
            end = clock() + slice_seconds


def _step(steps: Steps[T]) -> tuple[bool, T | None]:
    """One step: (False, None), or (True, the result) when that was the last."""
    try:
        next(steps)
    except StopIteration as stop:
        return True, stop.value
    return False, None
