"""Where a job's ticks and runs go on record: the ledger seam (see :mod:`taskd.ledger._base`)."""

from taskd.ledger._base import CLAIMING, HOST_CLAIM, Claim, Ledger, NotClaimed
from taskd.ledger.local import LocalLedger
from taskd.ledger.nofleet import NoFleetLedger
from taskd.ledger.null import NULL_LEDGER, NullLedger

__all__ = [
    "CLAIMING",
    "HOST_CLAIM",
    "NULL_LEDGER",
    "Claim",
    "Ledger",
    "LocalLedger",
    "NoFleetLedger",
    "NotClaimed",
    "NullLedger",
]
