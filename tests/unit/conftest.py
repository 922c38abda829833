"""Fixtures the in-process scheduler tests share."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from taskd.plugin.manager import PluginHost
from taskd.run.runtime import Runtime
from taskd.state.shared import SharedState


@pytest.fixture
def rt() -> Runtime:
    """A Runtime with no store: runs are logged, not recorded."""
    return Runtime(
        shared=SharedState(), store=None, host=PluginHost(), thread_workers=2, process_workers=1
    )


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
