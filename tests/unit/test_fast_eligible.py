"""JobSpec.fast: which jobs take the scheduler's fused run path, decided when the spec is made."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from taskd.config.model import JobConfig
from taskd.jobspec import JobSpec, make_trigger
from taskd.plugin.jobtype import JobType


async def _io(ctx: Any) -> None:
    return None


def _cpu() -> None:
    return None


def _spec(kind: str = "io", **fields: Any) -> JobSpec:
    cfg = JobConfig(name="j", type="t", **{"schedule": "every", "every": 1.0, **fields})
    jt = JobType("t", _io if kind == "io" else _cpu, kind=kind)  # type: ignore[arg-type]
    return JobSpec(cfg, jt, make_trigger(cfg))


class TestEligibility:
    """Only the common run is fused; anything else takes the general path."""

    def test_default_every_io_job_is_fast(self) -> None:
        assert _spec().fast
        assert _spec(overlap="queue").fast
        assert _spec(jitter=0.5, catchup="all").fast  # handled outside the run path

    @pytest.mark.parametrize(
        "spec",
        [
            pytest.param(lambda: _spec(timeout=5.0), id="timeout"),
            pytest.param(lambda: _spec(retries=1), id="retries"),
            pytest.param(lambda: _spec(overlap="allow"), id="allow"),
            pytest.param(lambda: _spec(overlap="replace"), id="replace"),
            pytest.param(lambda: _spec(kind="blocking"), id="blocking"),
            pytest.param(lambda: _spec(kind="cpu"), id="cpu"),
            pytest.param(lambda: _spec(schedule="cron", every=None, cron="* * * * *"), id="cron"),
            pytest.param(lambda: dataclasses.replace(_spec(), broken="no plugin"), id="broken"),
        ],
    )
    def test_others_are_not(self, spec: Any) -> None:
        assert not spec().fast

    def test_not_part_of_equality(self) -> None:
        """A reload compares specs (same_as, ==): the flag, derived, never makes a change."""
        a, b = _spec(), _spec()
        assert a == b and a.same_as(b)
        assert "fast" not in repr(a)
