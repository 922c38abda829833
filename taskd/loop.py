"""The event loop: uvloop when installed, asyncio's own otherwise (or with TASKD_LOOP=asyncio);
and :func:`run_main`, which keeps running the daemon when some other task raises SystemExit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    if os.environ.get("TASKD_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def new_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the chosen kind, set as the current one."""
    if loop_name() == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def run(main: Coroutine[Any, Any, T]) -> T:
    if loop_name() == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


# -- the main task ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stray:
    """A SystemExit or KeyboardInterrupt that a task or callback other than the main task
    raised, and what could be found out about where."""

    exc: BaseException
    task: str | None  # the task's name, when the task could still be found
    coro: str | None  # the task's coroutine, or the callback: "qualname (file:line)"
    files: tuple[str, ...]  # the traceback's source files, outermost first


def run_main(
    loop: asyncio.AbstractEventLoop,
    main: Coroutine[Any, Any, T],
    stray: Callable[[Stray], None],
) -> T:
    """Run ``main`` on ``loop`` to its end, whatever the other tasks raise.

    asyncio (and uvloop) let SystemExit and KeyboardInterrupt out of ``run_until_complete``
    from whichever task or callback raised them, in the middle of a loop iteration, with
    ``main`` still suspended. One that comes from anything but ``main`` is handed to
    ``stray`` and the loop runs on: the loop is left as it was (the rest of the iteration's
    callbacks are still queued), so nothing is lost but the task that raised.

    A real Ctrl-C never comes this way while ``main`` has a SIGINT handler on the loop (the
    loop takes the signal, Python raises nothing). While no handler is installed, SIGINT
    raises KeyboardInterrupt as Python's default handler does, and that is re-raised: it is
    the user's, not a plugin's."""
    task = loop.create_task(main, name="taskd-main")
    dropped = _note_dropped_tasks(loop)
    while True:
        try:
            return loop.run_until_complete(task)
        except (SystemExit, KeyboardInterrupt) as exc:
            if task.done():
                # main's own exception (re-raised here), or main ended in the same iteration
                # as another task raised: main's result is what counts.
                return task.result()
            if isinstance(exc, KeyboardInterrupt) and (
                signal.getsignal(signal.SIGINT) is signal.default_int_handler
            ):
                raise
            with contextlib.suppress(Exception):  # the report is best effort; running on is not
                stray(_describe(exc, dropped.get(id(exc))))
            dropped.clear()
            if type(loop).__module__.startswith("uvloop"):
                loop.call_soon(_resume_signals)


def _resume_signals() -> None:
    """Make uvloop act on the signals that came while it was not running (called on it).

    Between two run_until_complete calls uvloop does not listen: a signal is only recorded
    (by the handler add_signal_handler installed), and acted on at the next signal's wake-up,
    which may never come: a SIGTERM would be lost. A null byte on its wake-up fd, which it
    reads as "no signal", has it act on those recorded now. (asyncio's own loop keeps its
    wake-up fd across runs, and the byte of a signal waits there: nothing to do.)"""
    fd = signal.set_wakeup_fd(-1)
    try:
        if fd >= 0:
            os.write(fd, b"\0")
    except OSError:  # full: a wake-up is pending anyway
        pass
    finally:
        # A signal between the two calls writes no byte, but is recorded, and the byte
        # above has the loop look at what is recorded.
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)


def _note_dropped_tasks(loop: asyncio.AbstractEventLoop) -> dict[int, asyncio.Task[Any]]:
    """Have ``loop`` note, by their exception's id, the tasks it drops with a SystemExit or
    KeyboardInterrupt never retrieved, instead of reporting them.

    uvloop frees such a task before the exception leaves ``run_until_complete``: its "Task
    exception was never retrieved" report, from the task's ``__del__``, is the last sight of
    the task (and its name). The report that counts is run_main's; this keeps the name for it.
    Every other context goes to the handler that was there (asyncio's default: a log line)."""
    noted: dict[int, asyncio.Task[Any]] = {}
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc, future = context.get("exception"), context.get("future")
        if isinstance(exc, SystemExit | KeyboardInterrupt) and isinstance(future, asyncio.Task):
            noted[id(exc)] = future
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return noted


# Frames of the loop's own machinery, between run_main and the code that raised: asyncio's
# package, uvloop's compiled frames ("uvloop/loop.pyx") and this module.
_LOOP_FRAMES = (os.path.dirname(asyncio.__file__) + os.sep, "uvloop" + os.sep, __file__)


def _describe(exc: BaseException, task: asyncio.Task[Any] | None) -> Stray:
    frames: list[FrameType] = []
    tb = exc.__traceback__
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_LOOP_FRAMES):
            frames.append(tb.tb_frame)
        tb = tb.tb_next
    if task is None:
        task = _task_of(exc)
    code: CodeType | None = getattr(task.get_coro(), "cr_code", None) if task else None
    if code is None and frames:
        # The outermost frame past the loop's: the task's coroutine, or the callback.
        code = frames[0].f_code
    return Stray(
        exc=exc,
        task=task.get_name() if task is not None else None,
        coro=_where(code),
        files=tuple(f.f_code.co_filename for f in frames),
    )


def _task_of(exc: BaseException) -> asyncio.Task[Any] | None:
    """The done task whose exception ``exc`` is, if it is still alive.

    asyncio keeps every task in a private weak set (``_all_tasks`` up to 3.11,
    ``_scheduled_tasks`` since 3.12; ``all_tasks()`` leaves done ones out); without it, or
    once the task is gone, the traceback alone tells where. Reading the exception marks it
    retrieved: this report replaces asyncio's "exception was never retrieved"."""
    for name in ("_all_tasks", "_scheduled_tasks"):
        tasks = getattr(asyncio.tasks, name, None)
        if tasks is None:
            continue
        try:
            for task in list(tasks):
                if task.done() and not task.cancelled() and task.exception() is exc:
                    return task  # type: ignore[no-any-return]
        except Exception:  # private: whatever it became, the traceback still says where
            return None
    return None


def _where(code: CodeType | None) -> str | None:
    if code is None:
        return None
    return f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})"
