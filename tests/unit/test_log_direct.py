"""taskd.log.direct_json: the run line written without structlog's layers is byte for byte the
line structlog writes, and any logger it cannot serve that way is left to structlog."""

from __future__ import annotations

import io
import os
from typing import Any, TextIO

import pytest
import structlog

from taskd import log as logsetup

pytestmark = pytest.mark.usefixtures("structlog_reset")


@pytest.fixture(autouse=True)
def _one_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # One time for every line, so that two lines written apart can be compared whole.
    monkeypatch.setattr(logsetup, "utc_stamp", lambda: "2026-12-03T09:00:00.000001Z")


def _fields() -> dict[str, Any]:
    return {
        "job": "nightly",
        "run_id": "ab12-00002a",
        "attempt": 2,
        "outcome": "failed",
        "duration": 0.012345,
        "late": 0.000812,
        "cause": "manual",
        "error": 'ValueError("héllo \\n")',
        "result": {"rows": [1, 2.5, None], "note": "ü"},
    }


def _json_log(out: TextIO, journal: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """JSON logging to ``out`` (as journald's stream when ``journal``); the run logger."""
    if journal:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    logsetup.configure("info", "json", out)
    return structlog.get_logger("taskd.run").bind()


@pytest.mark.parametrize("method", ["info", "warning", "error"])
@pytest.mark.parametrize("journal", [False, True])
def test_same_bytes_as_structlog(
    method: str, journal: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    with open(tmp_path / "out", "w+") as out:
        log = _json_log(out, journal, monkeypatch)
        emit = logsetup.direct_json(log)
        assert emit is not None
        getattr(log, method)("run", **_fields())
        emit(method, "run", _fields())
        out.seek(0)
        lines = out.read().splitlines()
    assert len(lines) == 2
    assert lines[0] == lines[1]
    assert lines[0].startswith(logsetup.PRIORITY[method] if journal else '{"job": "nightly"')


def test_below_the_level_writes_nothing() -> None:
    out = io.StringIO()
    logsetup.configure("warning", "json", out)
    emit = logsetup.direct_json(structlog.get_logger("taskd.run").bind())
    assert emit is not None
    emit("info", "run", _fields())
    assert out.getvalue() == ""
    emit("error", "run", _fields())
    assert '"level": "error"' in out.getvalue()


def test_context_variables_are_merged_as_structlog_does() -> None:
    out = io.StringIO()
    logsetup.configure("info", "json", out)
    log = structlog.get_logger("taskd.run").bind()
    emit = logsetup.direct_json(log)
    assert emit is not None
    structlog.contextvars.bind_contextvars(request="r9")
    try:
        log.info("run", **_fields())
        emit("info", "run", _fields())
    finally:
        structlog.contextvars.clear_contextvars()
    first, second = out.getvalue().splitlines()
    assert first == second and '"request": "r9"' in first


def test_loggers_it_cannot_serve_are_left_to_structlog() -> None:
    logsetup.configure("info", "console", io.StringIO())
    assert logsetup.direct_json(structlog.get_logger("taskd.run").bind()) is None
    logsetup.configure("info", "json", io.StringIO())
    assert logsetup.direct_json(structlog.get_logger("taskd.run").bind(job="a")) is None
    assert logsetup.direct_json(structlog.get_logger("taskd.run")) is None  # the lazy proxy
    assert logsetup.direct_json(object()) is None


class TestRunLine:
    """direct_run_line: the commonest run line, formatted directly, byte for byte structlog's."""

    @pytest.mark.parametrize("journal", [False, True])
    @pytest.mark.parametrize(
        ("duration", "late"),
        [
            (2.8e-05, 0.000988),
            (0.0, -0.0),
            (1.0, 0.1),
            (123456.789012, -0.000123),
            (1e-06, 5e-324),
            (round(1 / 3, 6), round(2 / 3, 6)),
        ],
    )
    def test_same_bytes_as_structlog(
        self,
        journal: bool,
        duration: float,
        late: float,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Any,
    ) -> None:
        with open(tmp_path / "out", "w+") as out:
            log = _json_log(out, journal, monkeypatch)
            line = logsetup.direct_run_line(log)
            assert line is not None
            fields = {"job": "j_1.x-y", "run_id": "ab12cd00002a", "attempt": 1}
            fields |= {"outcome": "succeeded", "duration": duration, "late": late}
            log.info("run", **fields)
            line("j_1.x-y", "ab12cd00002a", 1, duration, late)
            with structlog.contextvars.bound_contextvars(request="r1"):
                log.info("run", **fields)
                line("j_1.x-y", "ab12cd00002a", 1, duration, late)
            out.seek(0)
            lines = out.read().splitlines()
        assert len(lines) == 4
        assert lines[0] == lines[1]
        assert lines[2] == lines[3] and '"request": "r1"' in lines[2]

    def test_none_when_info_is_filtered(self, tmp_path: Any) -> None:
        with open(tmp_path / "out", "w") as out:
            logsetup.configure("warning", "json", out)
            assert logsetup.direct_run_line(structlog.get_logger("taskd.run").bind()) is None
            logsetup.configure("info", "console", out)
            assert logsetup.direct_run_line(structlog.get_logger("taskd.run").bind()) is None
