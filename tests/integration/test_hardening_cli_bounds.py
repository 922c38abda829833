"""Bounded command-line inputs (issue 8, item 8): counts and environment-provided paths given to
the real `taskd` command end in a clear error, promptly, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from taskd.cli import MAX_COUNT
from tests.helpers import daemon_table, run_cli

pytestmark = pytest.mark.timeout(120)

LIMIT = 20.0  # seconds; each of these is a usage or config error, a fraction of a second


def taskd(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # A regression fails at LIMIT instead of running for hours.
    return run_cli(*args, cwd=cwd, env=env, timeout=LIMIT)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "taskd.toml").write_text(
        daemon_table() + '[jobs.h]\ntype = "system_health"\nevery = "1s"\n'
    )
    return tmp_path


class TestCounts:
    """-n is bounded: a count past it is a usage error (exit 2) saying the range."""

    @pytest.mark.parametrize("command", [["history"], ["next", "h"]], ids=["history", "next"])
    @pytest.mark.parametrize("n", ["0", str(MAX_COUNT + 1), "99999999999999999999"])
    def test_count_out_of_range(self, project: Path, command: list[str], n: str) -> None:
        result = taskd(*command, "-n", n, "-c", "taskd.toml", cwd=project)
        assert result.returncode == 2, result.stderr
        assert f"-n must be from 1 to {MAX_COUNT}" in result.stderr
        assert "Traceback" not in result.stderr


class TestEnvironmentPaths:
    """TASKD_CONFIG naming a path the system cannot look up, a FIFO or a device."""

    @pytest.mark.parametrize("command", ["history", "status", "reload", "jobs", "check"])
    def test_config_name_too_long(self, project: Path, command: str) -> None:
        path = "/tmp/" + "x" * 5000
        result = taskd(command, cwd=project, env={"TASKD_CONFIG": path})
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode != 0
        assert result.stderr.startswith("taskd"), result.stderr  # its own message, one of:
        assert any(
            what in result.stderr
            for what in ("File name too long", "no taskd is running", "no state database")
        ), result.stderr

    @pytest.mark.parametrize("kind", ["fifo", "device"])
    def test_config_not_a_regular_file(self, project: Path, kind: str) -> None:
        path = project / "fifo.toml"
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path = Path("/dev/zero")
        result = taskd("check", cwd=project, env={"TASKD_CONFIG": str(path)})
        assert result.returncode == 1, result.stderr
        assert f"{path}: is not a regular file" in result.stderr
