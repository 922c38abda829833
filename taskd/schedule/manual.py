"""ManualRun: what a caller of ``taskd trigger`` waits on while its run is queued, starts
and ends."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskd.run.events import SkipReason
    from taskd.run.runner import RunInfo


class ManualRun:
    """What a manual trigger waits on: ``started`` and ``ended`` are resolved with the run's
    RunInfo, or both with the SkipReason when it never runs (refused, or dropped from the
    queue)."""

    __slots__ = ("ended", "queued", "started")

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.queued = False  # waits behind a run in flight (overlap = "queue")
        self.started: asyncio.Future[RunInfo | SkipReason] = loop.create_future()
        self.ended: asyncio.Future[RunInfo | SkipReason] = loop.create_future()

    def begin(self, info: RunInfo | SkipReason) -> None:
        if not self.started.done():
            self.started.set_result(info)

    def end(self, value: RunInfo | SkipReason) -> None:
        for fut in (self.started, self.ended):
            if not fut.done():
                fut.set_result(value)
