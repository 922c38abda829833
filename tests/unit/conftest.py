"""Fixtures the in-process scheduler tests share."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from taskd.plugin.manager import PluginHost
from taskd.run.runtime import Runtime
from taskd.state.shared import SharedState
from taskd.state.store import StateStore


@pytest.fixture
def rt() -> Runtime:
    """A Runtime with no ledger (NULL_LEDGER): runs are logged, not recorded."""
    return Runtime(shared=SharedState(), host=PluginHost(), thread_workers=2, process_workers=1)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    """An open state store in ``tmp_path`` (state.db), closed after the test."""
    s = StateStore(tmp_path / "state.db")
    s.open()
    yield s
    s.close()


@pytest.fixture
def berlin() -> Iterator[None]:
    """Europe/Berlin for the test (CET in winter, CEST in summer), the old zone after."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture
def structlog_reset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that call taskd.log.configure: structlog and the root logger as they were
    after. The test run itself may be a systemd service: its JOURNAL_STREAM must not leak in."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_ToStructlog":
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
