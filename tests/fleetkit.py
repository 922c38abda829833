"""Fleet test helpers: a [fleet] table for a fresh database on the session's PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from taskd.config.model import FleetConfig
from tests.dbservers import FLEET_PASSWORD, PgServer


def fleet_config(postgres: PgServer, tmp_path: Path, **kw: Any) -> FleetConfig:
    """A FleetConfig for a new database (its own schema), the password in a file."""
    dsn = postgres.fleet_db(f"fleet_{uuid.uuid4().hex[:12]}")
    pw = tmp_path / "fleet.pw"
    pw.write_text(FLEET_PASSWORD + "\nrotated by the tests\n")
    return FleetConfig(dsn=dsn, password_file=pw, **kw)
