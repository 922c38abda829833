"""Which code holds the loop: the loop thread's frames, read from the watchdog thread.

For the blocked-loop report (taskd.observe.loopwatch): the culprit frame, the innermost
frames and the task the loop is running."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

STACK_DEPTH = 5  # frames given in a report's ``stack``
MAX_WALK = 256  # frames looked at for the culprit; a deeper stack is recursion, not news


def where(
    ident: int | None, is_plugin: Callable[[str], bool] | None, skip: Skip
) -> tuple[str | None, list[str], bool]:
    """The culprit frame ("file:line in function"), the innermost frames of thread ``ident``'s
    stack (innermost last), and whether plugin code was on it."""
    top = sys._current_frames().get(ident) if ident is not None else None
    frames: list[FrameType] = []
    f = top
    while f is not None and len(frames) < MAX_WALK:
        frames.append(f)
        f = f.f_back
    if not frames:
        return None, [], False
    # A plugin's own frame names the culprit best, even when the wait is deeper in a
    # library it calls (psutil, requests, socket.py); else the innermost frame outside the
    # standard library, uvloop and taskd. When neither is there, name the innermost.
    culprit = None
    if is_plugin is not None:
        culprit = next((f for f in frames if is_plugin(f.f_code.co_filename)), None)
    plugin_code = culprit is not None
    if culprit is None:
        culprit = next((f for f in frames if not skip(f.f_code.co_filename)), None)
        plugin_code = culprit is not None and is_plugin is None
    culprit = culprit or frames[0]
    code = culprit.f_code
    frame = f"{code.co_filename}:{culprit.f_lineno} in {code.co_qualname}"
    stack = [
        f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_qualname}"
        for f in reversed(frames[:STACK_DEPTH])
    ]
    return frame, stack, plugin_code


def current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
    """The task ``loop`` is running now, looked up from another thread.

    asyncio.current_task() answers only for the calling thread's loop, so this reads asyncio's
    own map of loop -> current task (``asyncio.tasks._current_tasks``; on CPython 3.11-3.13
    the C accelerator's dict, which uvloop's tasks use as well). Read-only, one lookup the GIL
    makes atomic, and for diagnosis only: where the map is missing or differs, a report simply
    names no job."""
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if not isinstance(tasks, dict):
        return None
    task = tasks.get(loop)
    return task if isinstance(task, asyncio.Task) else None


class Skip:
    """Which code is not the culprit: the standard library (asyncio, selectors, threading,
    socket...), uvloop and taskd. Site-packages inside the standard library's folder (a Python
    without a venv) are not skipped: installed plugins live there."""

    __slots__ = ("always", "keep", "stdlib")

    def __init__(self) -> None:
        import taskd

        always = [os.path.dirname(taskd.__file__) + os.sep, "<"]  # "<frozen ...>", "<string>"
        uvloop_file = getattr(sys.modules.get("uvloop"), "__file__", None)
        if uvloop_file:
            always.append(os.path.dirname(uvloop_file) + os.sep)
        self.always = tuple(always)
        self.stdlib = os.path.dirname(os.__file__) + os.sep
        self.keep = (self.stdlib + "site-packages" + os.sep, self.stdlib + "dist-packages" + os.sep)

    def __call__(self, filename: str) -> bool:
        if filename.startswith(self.always):
            return True
        return filename.startswith(self.stdlib) and not filename.startswith(self.keep)
