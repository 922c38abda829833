"""Where log lines go: the stream, one ``write(2)`` per event-loop iteration, and what happens
when the stream cannot take a line.

Lines logged on the event loop (the main thread's) wait in a batch that one ``call_soon``
callback writes early in the next iteration, before the loop can sleep in its poll: a
thousand runs ending in one iteration cost one system call, not a thousand, and no line is
held while the loop waits (a ``kill -9`` loses only what was logged in the iteration it
interrupted). The batch is also written once it reaches 64 KiB, at exit, before a fork, and by
:func:`flush_std_streams`. A line from any other thread is written at once, together with the
batch ahead of it and under the same lock (as is a line logged while no loop runs), so lines
keep their order and never interleave.

Writing a line never raises: a line the output cannot take (stdout closed, the reader of a pipe
gone, a full disk) is dropped and counted (:func:`dropped_lines`): each line of a batch that
did not go out counts as one."""

from __future__ import annotations

import asyncio
import atexit
import errno
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TextIO

# Characters (JSON lines are ASCII, so bytes) after which a batch is written without waiting
# for the end of the iteration: bounds the memory a burst holds and the size of one write.
BATCH_LIMIT = 64 * 1024

# Seconds a batch waits for room in an fd that was made non-blocking before its lines are
# dropped (counted); a blocking fd waits as long as its reader makes it.
BLOCKED_WAIT = 10.0

# Failures after which the stream never takes a line again: the pipe's or socket's reader has
# gone (journald restarted, `taskd run | head` ended), or the fd was closed. A full disk, a
# quota or an I/O error may pass, so those lines are dropped but later ones are tried again.
_GONE_ERRNOS = frozenset(
    {errno.EPIPE, errno.EBADF, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN}
)

_dropped = 0
_dropped_lock = threading.Lock()

# The C function behind asyncio.get_running_loop, without its exception when there is none.
_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident
_main_ident = threading.main_thread().ident


def dropped_lines() -> int:
    """Log lines dropped since start because the output could not take them."""
    return _dropped


def _count_dropped(lines: int = 1) -> None:
    global _dropped
    with _dropped_lock:
        _dropped += lines


def _drop(text: str) -> int:
    _count_dropped()
    return 0


def _nothing() -> None:
    pass


class Output:
    """The stream log lines go to, shared by every logger :func:`configure` makes for it,
    with the batch of lines the loop has logged in this iteration.

    A stream with a file descriptor (stdout) is written with ``os.write`` on it, after the
    stream's own buffer (a ``print``): the batch is encoded as the stream would, in one
    system call, and a write cut short (a signal while the reader was slow) is completed,
    where a ``TextIOWrapper`` over an unbuffered file (``PYTHONUNBUFFERED=1``, as the unit
    file sets it) would drop the rest. Other streams (a StringIO) get ``write`` and
    ``flush``.

    A line whose write or flush fails is dropped and counted: the log must never be what
    crashes or stops the daemon. When the stream is gone for good, :attr:`write` becomes a
    counter (no system call, no exception per line), and the stream's fd (and stdout's or
    stderr's, if they share its file) is pointed at /dev/null, so that nothing else can fail
    on it: Python's own flush at exit, a stray print, the failed line's buffered bytes."""

    __slots__ = (
        "__weakref__",
        "_busy",
        "_encoding",
        "_errors",
        "_fd",
        "_lines",
        "_scheduled",
        "_size",
        "_torn",
        "flush",
        "lock",
        "stream",
        "write",
    )

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        # Re-entrant: a finaliser that logs (asyncio's "Task was destroyed") can run in the
        # middle of a write, on the same thread; a plain Lock would hang the daemon there.
        self.lock = threading.RLock()
        self._busy = False  # a write is under way (on the thread holding the lock)
        self.write: Callable[[str], int] = _drop
        self.flush: Callable[[], None] = _nothing
        self._fd, self._encoding, self._errors = -1, "utf-8", "strict"
        if stream is not None:  # None: sys.stdout, when fd 1 was closed at exec
            self.write, self.flush = stream.write, stream.flush
            try:
                fd, encoding, errors = stream.fileno(), stream.encoding, stream.errors
            except (OSError, ValueError, AttributeError):  # no fd (StringIO), or closed
                pass
            else:
                if isinstance(encoding, str) and isinstance(errors, str):
                    self._fd, self._encoding, self._errors = fd, encoding, errors
        self._lines: list[str] = []
        self._size = 0
        self._torn = False  # the last write on the fd stopped part-way through a line
        # The loop whose callback will write the batch; None while none is due.
        self._scheduled: asyncio.AbstractEventLoop | None = None
        _all_outputs.add(self)

    @property
    def gone(self) -> bool:
        return self.write is _drop

    def put(self, line: str) -> None:
        """Hand over one rendered line (without its newline); never raises."""
        loop = _running_loop()
        with self.lock:
            if self.write is _drop:
                _count_dropped()
                return
            self._lines.append(line)
            # Only the main thread's loop batches: a loop a plugin runs in a thread of its
            # own may be stopped for good right after this line, with the callback unrun.
            if loop is None or _get_ident() != _main_ident:
                self._write_batch()
                return
            self._size += len(line)
            if self._scheduled is not loop:
                self._scheduled = loop
                loop.call_soon(self.write_pending)
            if self._size >= BATCH_LIMIT:
                self._write_batch()

    def write_pending(self) -> None:
        """Write the batch now (the loop's callback, and every flush)."""
        with self.lock:
            self._scheduled = None
            self._write_batch()

    def _write_batch(self) -> None:
        # Called with the lock held. Re-entered from a write (a finaliser logging), the line
        # is left in the batch for the write under way to take next, after its own lines.
        if self._busy:
            return
        self._busy = True
        try:
            while self._lines:
                lines = self._lines
                self._lines = []
                self._size = 0
                if self.write is _drop:
                    _count_dropped(len(lines))
                elif self._fd >= 0:
                    self._write_fd(lines)
                else:
                    self._write_stream(lines)
        finally:
            self._busy = False

    def _write_fd(self, lines: list[str]) -> None:
        try:
            self.flush()  # what the stream holds itself (a print) goes first, as before
        except (OSError, ValueError) as exc:  # ValueError: a plugin closed the stream
            self._failed(exc, len(lines))
            return
        try:
            data = ("\n".join(lines) + "\n").encode(self._encoding, self._errors)
        except ValueError:  # a line the encoding cannot take: that line is lost, not all
            data = b"".join(self._encodable(lines))
        start = 0  # where the lines begin: after the newline that ends a torn line
        if self._torn:
            data, start = b"\n" + data, 1
        done = 0
        deadline = 0.0
        try:
            while done < len(data):
                try:
                    done += os.write(self._fd, data[done:] if done else data)
                except BlockingIOError:
                    # An fd someone made non-blocking (a shared pipe whose other user set
                    # O_NONBLOCK): wait for room as a blocking write would, rather than drop
                    # the rest of the batch; but not for ever, as a stuck reader would make us.
                    now = time.monotonic()
                    deadline = deadline or now + BLOCKED_WAIT
                    if now >= deadline or not select.select([], [self._fd], [], deadline - now)[1]:
                        raise
        except OSError as exc:
            self._failed(exc, data.count(b"\n", max(done, start)))
            # A line cut part-way: the next write ends it first, so the line after it
            # does not run on into the fragment and both stay parseable apart.
            if done > 0:  # (nothing written: a torn line before this one stays torn)
                self._torn = data[done - 1] != 10
        else:
            self._torn = False

    def _encodable(self, lines: list[str]) -> list[bytes]:
        parts = []
        for line in lines:
            try:
                parts.append((line + "\n").encode(self._encoding, self._errors))
            except ValueError:
                _count_dropped()
        return parts

    def _write_stream(self, lines: list[str]) -> None:
        try:
            self.write("\n".join(lines) + "\n")
            self.flush()
        except (OSError, ValueError) as exc:  # BrokenPipeError is an OSError
            if isinstance(exc, OSError) or len(lines) == 1 or self._is_gone(exc):
                self._failed(exc, len(lines))
                return
        else:
            return
        # A ValueError on an open stream: a line it cannot encode (a lone surrogate). The
        # encoder fails before anything is written, so writing the lines one by one loses
        # that line only, as when each line had a write of its own.
        for n, line in enumerate(lines):
            try:
                self.write(line + "\n")
                self.flush()
            except (OSError, ValueError) as exc:
                self._failed(exc, 1)
                if self.write is _drop:
                    _count_dropped(len(lines) - n - 1)
                    return

    def _is_gone(self, exc: OSError | ValueError) -> bool:
        # A closed stream object (a plugin closed sys.stdout) is gone for good too; a
        # ValueError on an open one (a line that cannot be encoded) costs that line only.
        return getattr(exc, "errno", None) in _GONE_ERRNOS or bool(
            getattr(self.stream, "closed", False)
        )

    def _failed(self, exc: OSError | ValueError, lines: int) -> None:
        """Count the ``lines`` that ``exc`` stopped (called with :attr:`lock` held)."""
        _count_dropped(lines)
        if self._is_gone(exc):
            self.write, self.flush = _drop, _nothing
            _to_devnull(self.stream)

    def _after_fork_in_child(self) -> None:
        # The parent writes what it still holds; a copy written by the child too would be
        # doubled. The lock may have been held by a thread that does not exist here.
        self.lock = threading.RLock()
        self._busy = False
        self._lines = []
        self._size = 0
        self._scheduled = None


# Every Output, for the writes at exit and before a fork.
_all_outputs: weakref.WeakSet[Output] = weakref.WeakSet()

# The Output of each stream, so that a second configure() (a reload) keeps what the first
# learnt: after a redirect to /dev/null writes would succeed, and go uncounted.
_outputs: weakref.WeakKeyDictionary[Any, Output] = weakref.WeakKeyDictionary()


def output(stream: TextIO | None) -> Output:
    """The Output for ``stream`` (the one made before, if any)."""
    if stream is None:
        return Output(None)
    try:
        out = _outputs.get(stream)
    except TypeError:  # a stream that takes no weak reference: not remembered
        return Output(stream)
    if out is None:
        out = _outputs[stream] = Output(stream)
    return out


def write_all_pending() -> None:
    """Write every Output's batch now (at exit, before a fork, before ``os._exit``)."""
    for out in list(_all_outputs):
        out.write_pending()


def _after_fork_in_child() -> None:
    global _main_ident
    _main_ident = _get_ident()  # the thread that forked is the child's only one
    for out in list(_all_outputs):
        out._after_fork_in_child()


atexit.register(write_all_pending)
# Before: the child's output (a command job's, a worker's) comes after the lines logged before
# it started. In the child: the batch is the parent's to write, not the child's too.
os.register_at_fork(before=write_all_pending, after_in_child=_after_fork_in_child)


def _to_devnull(stream: TextIO | None) -> None:
    """Point ``stream``'s fd, and stdout's and stderr's when they are the same file (as
    under systemd), at /dev/null; then flush away what the stream still buffers."""
    try:
        fd = stream.fileno() if stream is not None else -1
        target = os.fstat(fd)
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    except (OSError, ValueError, AttributeError):  # no fd (StringIO), or closed already
        return
    try:
        for other in {fd, 1, 2}:
            try:
                st = os.fstat(other)
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    os.dup2(null, other, inheritable=os.get_inheritable(other))
            except OSError:
                continue
    finally:
        os.close(null)
    for std in {stream, sys.stdout, sys.stderr}:
        try:
            if std is not None:
                std.flush()
        except (OSError, ValueError):
            pass


class LineLogger:
    """structlog's logger over an :class:`Output`: hands each rendered line to it, which
    batches or writes it and never raises into the code that logs."""

    __slots__ = ("_out",)

    def __init__(self, out: Output) -> None:
        self._out = out

    def __repr__(self) -> str:
        return f"<LineLogger(file={self._out.stream!r})>"

    def msg(self, message: str) -> None:
        self._out.put(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class LineLoggerFactory:
    """structlog's ``logger_factory``: every logger for one stream shares its Output."""

    __slots__ = ("_out",)

    def __init__(self, stream: TextIO | None) -> None:
        self._out = output(stream)

    def __call__(self, *args: Any) -> LineLogger:
        return LineLogger(self._out)


def std_fds_open() -> None:
    """Give fds 0, 1 and 2 /dev/null where they were closed at exec (``taskd run >&-``):
    else the next file opened takes the number, and whatever writes to "stdout" (a
    command job's child) writes into the state database or a socket."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one, or below
            if null == fd:
                os.set_inheritable(fd, True)  # children get it as their own stdio
            else:
                os.dup2(null, fd, inheritable=True)
                os.close(null)


def flush_std_streams() -> None:
    """Write the pending log lines, then flush stdout and stderr, whatever state they are in
    (before ``os._exit``)."""
    write_all_pending()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
