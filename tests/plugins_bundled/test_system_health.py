"""The bundled system_health plugin, against this machine's real psutil figures."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import taskd


@pytest.fixture
def health(load_plugin: Callable[[str], types.ModuleType]) -> types.ModuleType:
    return load_plugin("system_health")


def _off() -> dict[str, Any]:
    """Thresholds nothing can exceed: percents cannot pass 100."""
    return {
        "disk_percent": 100.0,
        "memory_percent": 100.0,
        "swap_percent": 100.0,
        "load_per_cpu": 1e9,
    }


class TestRegistration:
    """The hook offers one blocking job type with TOML-typed options."""

    def test_job_type(
        self,
        health: types.ModuleType,
        job_types: Callable[[types.ModuleType], list[taskd.JobType]],
        options_contract: Callable[[taskd.JobType], None],
    ) -> None:
        (job,) = job_types(health)
        assert (job.name, job.kind, job.func) == ("system_health", "blocking", health.system_health)
        options_contract(job)


class TestFigures:
    """Below every threshold, the run returns the figures."""

    def test_reports_every_figure(self, health: types.ModuleType, tmp_path: Path) -> None:
        figures = health.system_health(paths=[str(tmp_path), "/"], **_off())
        assert set(figures["disk"]) == {str(tmp_path), "/"}
        usage = psutil.disk_usage(str(tmp_path))
        assert figures["disk"][str(tmp_path)]["total"] == usage.total
        assert 0.0 <= figures["memory"]["percent"] <= 100.0
        assert figures["memory"]["total"] == psutil.virtual_memory().total
        assert 0.0 <= figures["swap"]["percent"] <= 100.0
        assert set(figures["load"]) == {"1m", "5m", "15m"}
        assert figures["cpus"] == psutil.cpu_count()
        assert figures["load_per_cpu"]["5m"] == round(figures["load"]["5m"] / figures["cpus"], 3)
        assert "processes" not in figures

    def test_counts_processes_when_asked(self, health: types.ModuleType) -> None:
        figures = health.system_health(count_processes=True, **_off())
        # At least this test process and PID 1.
        assert figures["processes"] >= 2

    def test_result_is_json_serialisable(self, health: types.ModuleType) -> None:
        import json

        figures = health.system_health(count_processes=True, **_off())
        assert json.loads(json.dumps(figures)) == figures

    async def test_runs_in_a_thread(self, health: types.ModuleType) -> None:
        # As the daemon runs a blocking job: in a worker thread, off the loop.
        figures = await asyncio.to_thread(health.system_health, **_off())
        assert "/" in figures["disk"]


class TestThresholds:
    """Crossing thresholds raises, naming every one crossed."""

    def test_all_crossed_are_listed(self, health: types.ModuleType, tmp_path: Path) -> None:
        # Anything in use exceeds 0: the disk holding tmp_path and memory are.
        with pytest.raises(RuntimeError) as info:
            health.system_health(
                paths=[str(tmp_path)], disk_percent=0.0, memory_percent=0.0, load_per_cpu=1e9
            )
        message = str(info.value)
        assert f"disk {tmp_path}" in message
        assert "> disk_percent 0%" in message
        assert "memory" in message
        assert "> memory_percent 0%" in message
        assert "load" not in message
        err: Any = info.value
        assert isinstance(err, health.ThresholdExceeded)
        assert len(err.crossed) == 2
        # The figures travel with the error, for a failure hook to report.
        assert str(tmp_path) in err.figures["disk"]

    def test_load_per_cpu(self, health: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        # The load average cannot be raised on demand, so psutil reports a busy machine.
        cpus = psutil.cpu_count() or 1
        monkeypatch.setattr(psutil, "getloadavg", lambda: (0.0, 3.0 * cpus, 0.0))
        with pytest.raises(RuntimeError, match=r"5-minute load per CPU 3 > load_per_cpu 2$"):
            health.system_health(**{**_off(), "load_per_cpu": 2.0})
        assert health.system_health(**{**_off(), "load_per_cpu": 3.0})["load_per_cpu"]["5m"] == 3.0

    def test_hundred_percent_is_never_exceeded(self, health: types.ModuleType) -> None:
        health.system_health(disk_percent=100.0, memory_percent=100.0, swap_percent=100.0)

    def test_defaults_leave_swap_and_load_unchecked(
        self, health: types.ModuleType, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(psutil, "getloadavg", lambda: (1e6, 1e6, 1e6))
        health.system_health(disk_percent=100.0, memory_percent=100.0)

    def test_error_pickles_with_its_details(self, health: types.ModuleType) -> None:
        import pickle

        err = health.ThresholdExceeded(["memory 95% > memory_percent 90%"], {"cpus": 1})
        copy = pickle.loads(pickle.dumps(err))
        assert (str(copy), copy.crossed, copy.figures) == (str(err), err.crossed, err.figures)


class TestBadOptions:
    """Bad options fail with a message naming the option."""

    def test_missing_paths_are_all_named(self, health: types.ModuleType, tmp_path: Path) -> None:
        a, b = tmp_path / "nope", tmp_path / "neither"
        with pytest.raises(FileNotFoundError, match="'paths'") as info:
            health.system_health(paths=["/", str(a), str(b)])
        assert str(a) in str(info.value)
        assert str(b) in str(info.value)

    @pytest.mark.parametrize("value", [-1.0, float("nan")])
    def test_negative_or_nan_threshold(self, health: types.ModuleType, value: float) -> None:
        with pytest.raises(ValueError, match="'memory_percent' must be >= 0"):
            health.system_health(memory_percent=value)

    def test_bool_threshold(self, health: types.ModuleType) -> None:
        with pytest.raises(TypeError, match="'load_per_cpu' must be a number"):
            health.system_health(load_per_cpu=True)
