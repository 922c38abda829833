"""Shared fixtures. ``daemon_factory`` starts ``taskd run`` as a real process (see
tests/helpers.py) and always cleans up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Real database servers (session-scoped: each starts once, in about a second).
from tests.dbservers import mariadb, mariadb_server, postgres, postgres_server  # noqa: F401
from tests.helpers import DaemonProc

# n real `taskd run` hosts sharing a fresh fleet database (tests/integration/test_fleet.py).
from tests.integration.fleet_harness import fleet_hosts  # noqa: F401


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    """``daemon_factory(config, plugins={"x.py": source}, name="d1", env={})`` -> DaemonProc (not started)."""
    made: list[DaemonProc] = []

    def create(
        config: str,
        plugins: dict[str, str] | None = None,
        *,
        name: str = "d",
        env: dict[str, str] | None = None,
    ) -> DaemonProc:
        d = DaemonProc(tmp_path / name, config, plugins or {}, env)
        made.append(d)
        return d

    yield create
    for d in made:
        d.kill()
