"""Log set-up: console lines on a terminal, JSON lines otherwise, and the level filter."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import structlog

from taskd import log as logsetup


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_structlog():
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_ToStructlog":
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


class TestFormat:
    """`auto` picks by whether the stream is a terminal."""

    def test_auto_is_json_when_not_a_tty(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "auto", out)
        structlog.get_logger("t").info("run", job="a", outcome="succeeded")
        line = json.loads(out.getvalue())
        assert line["event"] == "run" and line["job"] == "a" and line["level"] == "info"
        assert line["timestamp"].endswith("Z")

    def test_auto_is_console_on_a_tty(self) -> None:
        out = _Tty()
        logsetup.configure("info", "auto", out)
        structlog.get_logger("t").info("run", job="a")
        raw = out.getvalue()
        assert "\x1b[" in raw  # coloured on a terminal
        text = re.sub(r"\x1b\[[0-9;]*m", "", raw)
        assert "[info     ] run" in text and "job=a" in text
        assert not text.lstrip().startswith("{")  # a line for people, not a JSON object

    def test_forced_json_on_a_tty(self) -> None:
        out = _Tty()
        logsetup.configure("info", "json", out)
        structlog.get_logger("t").info("x")
        assert json.loads(out.getvalue())["event"] == "x"


class TestLevel:
    """`log_level` drops lines below it, for structlog and stdlib logging alike."""

    def test_debug_dropped_at_info(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "json", out)
        structlog.get_logger("t").debug("hidden")
        structlog.get_logger("t").warning("shown")
        events = [json.loads(x)["event"] for x in out.getvalue().splitlines()]
        assert events == ["shown"]

    def test_stdlib_logging_goes_through_the_same_renderer(self) -> None:
        out = io.StringIO()
        logsetup.configure("info", "json", out)
        logging.getLogger("asyncio").error("something from a library")
        line = json.loads(out.getvalue())
        assert line["event"] == "something from a library" and line["level"] == "error"
