"""Waiting for commits: :meth:`CommitWaits.durable` returns once everything written so far is
committed by the state writer's thread (taskd.state.writer). The StateStore's part that the
loop awaits; the writer calls ``_on_cycle`` after each commit."""

from __future__ import annotations

import asyncio

from taskd.state.writer import Writer


class CommitWaits:
    def __init__(self) -> None:
        self._writer: Writer | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def durable(self) -> None:
        """Return once everything written so far is committed (at once while writes are
        failing: the runs go on, the writer keeps retrying)."""
        w = self._writer
        if w is None or w.failing or w.committed >= w.submitted:
            return
        self._loop = asyncio.get_running_loop()
        fut = self._loop.create_future()
        self._waiters.append((w.submitted, fut))
        w.hurry()  # after the append: the cycle it starts sees this waiter
        await fut

    def _on_cycle(self) -> None:
        """On the writer's thread, after each commit (or failed commit)."""
        loop = self._loop
        if self._waiters and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        w = self._writer
        keep = []
        for target, fut in self._waiters:
            if fut.done():
                continue
            if w is None or w.failing or w.committed >= target:
                fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep
