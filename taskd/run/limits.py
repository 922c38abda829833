"""Bounds on what a run hands back to the daemon: its error text. (Standard library only:
the pool's workers import it.)"""

from __future__ import annotations

__all__ = ["MAX_ERROR_TEXT", "MAX_REMOTE_TEXT", "cut"]

# A run's error text as recorded: the run log line, the history row, the event hooks. A job
# that raises with a 5 MB message must not write 5 MB lines and rows on every run.
MAX_ERROR_TEXT = 4096
# Each text of a cpu run's error reply (its message, its traceback) is cut to this in the
# worker, so a huge one never crosses the pipe; the traceback goes into the exception's notes.
MAX_REMOTE_TEXT = 16_384


def cut(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text``, or its first ``limit`` characters and a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"
