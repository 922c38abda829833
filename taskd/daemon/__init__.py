"""The daemon's lifecycle: start (start.py), serve and signals (serve.py), stop (stop.py)."""

from taskd.daemon.serve import Daemon
from taskd.daemon.start import EXIT_OK, EXIT_STATE

__all__ = ["EXIT_OK", "EXIT_STATE", "Daemon"]
