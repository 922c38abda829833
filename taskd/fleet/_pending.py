"""Stand-ins for names that branch i10-claim adds (``FleetConfig`` in taskd.config.model,
``NotClaimed`` in taskd.ledger._base, two SkipReasons). # until i10-claim lands: the lead
replaces each with an import of the real one at merge; the fields and names match the design
(issue10-design.md §2.1, §4.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# until i10-claim lands: SkipReason.ELSEWHERE / SkipReason.FLEET_DOWN
ELSEWHERE = "elsewhere"
FLEET_DOWN = "fleet_unavailable"


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


class NotClaimed(Exception):  # until i10-claim lands (taskd.ledger._base.NotClaimed)
    """The ledger refused the run: its tick becomes a skip with ``reason``, never a run."""

    def __init__(self, reason: str, detail: str = "", holder: str | None = None) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail
        self.holder = holder
