"""Fixtures the in-process scheduler tests share."""

from __future__ import annotations

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
