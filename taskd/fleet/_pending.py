"""A stand-in for ``FleetConfig``, which branch i10-claim adds to taskd.config.model (C5).
# until i10-claim lands: the lead replaces it with an import of the real one at merge; the
fields and names match the design (issue10-design.md §4.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class FleetConfig:  # until i10-claim lands (taskd.config.model.FleetConfig)
    """The ``[fleet]`` table (durations in seconds)."""

    dsn: str
    password_file: str | None = None
    password_env: str | None = None
    node: str = ""
    lease: float = 30.0
    sweep: float = 5.0
    claim_window: float = 3600.0
    on_owner_lost: Literal["retry", "abandon"] = "retry"
    max_takeovers: int = 3
    connect_timeout: float = 5.0
