"""Helpers for testing job plugins with pytest, without a daemon.

from taskd.testing import make_context

async def test_my_job():
    ctx = make_context("my-job")
    assert await my_job(ctx, url="...") == ...
    assert ctx.state.get("my-job") == ...
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import structlog

from taskd.run.context import JobContext, Offloader
from taskd.state.shared import SharedState


def make_context(
    job: str = "test-job",
    *,
    attempt: int = 1,
    scheduled: datetime | None = None,
    state: SharedState | None = None,
    offload: Offloader | None = None,
    **log_fields: Any,
) -> JobContext:
    """A real :class:`JobContext` with a fresh shared state, for calling an ``io`` job directly.

    Must be called while an event loop runs (the state's lock belongs to it)."""
    run_id = uuid.uuid4().hex[:12]
    return JobContext(
        job=job,
        run_id=run_id,
        attempt=attempt,
        scheduled=scheduled or datetime.now(UTC),
        log=structlog.get_logger("taskd.job").bind(job=job, run_id=run_id, **log_fields),
        state=state if state is not None else SharedState(),
        offload=offload,
    )
