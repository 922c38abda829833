"""structlog set-up: console lines on a terminal, one JSON object per line otherwise (journald).

When the output stream is systemd's journal, each line starts with its syslog priority
(``<3>`` for an error): journald strips the prefix and files the line at that level, so
``journalctl -p err`` and ``-p warning`` filter the daemon's lines.

Writing a line never raises: a line the output cannot take (stdout closed, the reader of a pipe
gone, a full disk) is dropped and counted (:func:`dropped_lines`)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# sd-daemon(3)'s line prefixes, keyed by structlog's method name (what the renderer is handed
# without a lookup of its own). Unknown names fall back to info, journald's own default.
PRIORITY = {
    "debug": "<7>",
    "info": "<6>",
    "warning": "<4>",
    "warn": "<4>",
    "error": "<3>",
    "exception": "<3>",
    "critical": "<2>",
    "fatal": "<2>",
}
_INFO = PRIORITY["info"]


def is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to systemd's journal.

    systemd sets ``$JOURNAL_STREAM`` to the ``device:inode`` of the stream it connected, and
    children inherit the variable even when their own output goes elsewhere: only a match
    with the stream's own fd counts (systemd.exec(5), sd_journal_stream_fd(3))."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):  # no fd (StringIO), closed, or garbage
        return False


class _JournalJSON(structlog.processors.JSONRenderer):
    """The JSON line with its priority in front: the same object as :class:`JSONRenderer`
    writes (same serializer and fallback), and no extra call per line, since this is every
    run's log line."""

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        return PRIORITY.get(name, _INFO) + json.dumps(event_dict, **self._dumps_kw)


# --------------------------------------------------------------------------- console

# Seconds, by the names the daemon uses for them; shown in ms or s instead of raw floats.
DURATION_KEYS = frozenset({"duration", "late", "took", "blocked_for", "retry_in", "uptime"})
RESULT_WIDTH = 80  # characters of a result's one-line summary, the ellipsis included

_RESET = "\x1b[0m"
_BRIGHT = "\x1b[1m"
_KEY = "\x1b[36m"  # cyan, as structlog's own console
_LEVEL_STYLE = {
    "debug": "\x1b[34m",
    "info": "\x1b[32m",
    "warning": "\x1b[33m",
    "error": "\x1b[31m",
    "critical": "\x1b[31;1m",
}
# A string value shown bare: nothing that would make `k=v k2=v2` ambiguous or span lines.
_BARE = re.compile(r"[^\s='\"\\]+\Z")
_NOT_FIELDS = ("event", "level", "exc_info", "exception", "stack")


def seconds(value: float) -> str:
    """A duration in seconds, rounded for reading: ``12.3ms``, ``250ms``, ``1.25s``, ``42.0s``.

    The thresholds sit where the rounding would carry (``0.9996`` is ``1.00s``, not
    ``1000ms``)."""
    size = abs(value)
    if size < 0.09995:
        return f"{value * 1000:.1f}ms"
    if size < 0.9995:
        return f"{value * 1000:.0f}ms"
    if size < 9.995:
        return f"{value:.2f}s"
    if size < 99.95:
        return f"{value:.1f}s"
    return f"{value:.0f}s"


def summary(value: Any, width: int = RESULT_WIDTH) -> str:
    """A job's result on one line: compact JSON (its repr if it is not JSON), cut to
    ``width`` characters with an ellipsis. JSON escapes newlines, so it never wraps the line."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)
    except (TypeError, ValueError):  # a circular structure, or a repr that raised
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _value(key: str, value: Any) -> str:
    if key in DURATION_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
        return seconds(value)
    if key == "result":
        return summary(value)
    if isinstance(value, str):
        return value if _BARE.match(value) else repr(value)
    return repr(value)


def _traceback(exc_info: Any) -> str:
    """``exc_info`` as structlog accepts it (True, an exception, or a sys.exc_info() tuple),
    formatted as Python prints it; empty when there is none."""
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return ""
    return "".join(traceback.format_exception(*exc_info))


class ConsoleLines:
    """Lines for people: short local time, level, the event, ``job``, then the other fields
    in the order the call site gave them (the same for every line of an event).

    Durations are in ms or s, a ``result`` is a one-line summary, and a traceback follows its
    line as Python prints it. With ``prefix`` (the stream is the journal) every line of the
    output, traceback lines included, carries the priority, or journald would file a
    traceback's lines as info."""

    def __init__(self, colors: bool = False, prefix: bool = False) -> None:
        self.colors = colors
        self.prefix = prefix

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        level = str(event_dict.get("level", name))
        event = str(event_dict.get("event", ""))
        keys = [k for k in event_dict if k not in _NOT_FIELDS]
        if "job" in event_dict:
            keys.remove("job")
            keys.insert(0, "job")
        if self.colors:
            style = _LEVEL_STYLE.get(level, "")
            head = f"{stamp} {style}{level:<8}{_RESET} {_BRIGHT}{event}{_RESET}"
            fields = [f"{_KEY}{k}{_RESET}={_value(k, event_dict[k])}" for k in keys]
        else:
            head = f"{stamp} {level:<8} {event}"
            fields = [f"{k}={_value(k, event_dict[k])}" for k in keys]
        text = " ".join([head, *fields])
        tails = [
            _traceback(event_dict.get("exc_info")),
            str(event_dict.get("exception") or ""),  # already formatted upstream
            str(event_dict.get("stack") or ""),  # stack_info=True
        ]
        for tail in tails:
            if tail:
                text += "\n" + tail.rstrip("\n")
        if self.prefix:
            mark = PRIORITY.get(name, _INFO)
            text = mark + text.replace("\n", "\n" + mark)
        return text


# --------------------------------------------------------------------------- output

# Failures after which the stream never takes a line again: the pipe's or socket's reader has
# gone (journald restarted, `taskd run | head` ended), or the fd was closed. A full disk, a
# quota or an I/O error may pass, so those lines are dropped but later ones are tried again.
_GONE_ERRNOS = frozenset(
    {errno.EPIPE, errno.EBADF, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN}
)

_dropped = 0
_dropped_lock = threading.Lock()


def dropped_lines() -> int:
    """Log lines dropped since start because the output could not take them."""
    return _dropped


def _count_dropped() -> None:
    global _dropped
    with _dropped_lock:
        _dropped += 1


def _drop(text: str) -> int:
    _count_dropped()
    return 0


def _nothing() -> None:
    pass


class Output:
    """The stream log lines go to, shared by every logger :func:`configure` makes for it.

    A line whose write or flush fails is dropped and counted: the log must never be what
    crashes or stops the daemon. When the stream is gone for good, :attr:`write` becomes a
    counter (no system call, no exception per line), and the stream's fd (and stdout's or
    stderr's, if they share its file) is pointed at /dev/null, so that nothing else can fail
    on it: Python's own flush at exit, a stray print, the failed line's buffered bytes."""

    __slots__ = ("__weakref__", "flush", "lock", "stream", "write")

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.write: Callable[[str], int] = _drop
        self.flush: Callable[[], None] = _nothing
        if stream is not None:  # None: sys.stdout, when fd 1 was closed at exec
            self.write, self.flush = stream.write, stream.flush

    @property
    def gone(self) -> bool:
        return self.write is _drop

    def failed(self, exc: OSError | ValueError) -> None:
        """Count the line that ``exc`` stopped (called with :attr:`lock` held)."""
        _count_dropped()
        # A closed stream object (a plugin closed sys.stdout) is gone for good too; a
        # ValueError on an open one (a line that cannot be encoded) costs that line only.
        if getattr(exc, "errno", None) in _GONE_ERRNOS or getattr(self.stream, "closed", False):
            self.write, self.flush = _drop, _nothing
            _to_devnull(self.stream)


# The Output of each stream, so that a second configure() (a reload) keeps what the first
# learnt: after a redirect to /dev/null writes would succeed, and go uncounted.
_outputs: weakref.WeakKeyDictionary[Any, Output] = weakref.WeakKeyDictionary()


def _output(stream: TextIO | None) -> Output:
    if stream is None:
        return Output(None)
    try:
        out = _outputs.get(stream)
    except TypeError:  # a stream that takes no weak reference: not remembered
        return Output(stream)
    if out is None:
        out = _outputs[stream] = Output(stream)
    return out


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
    """structlog's ``WriteLogger`` (write the line, flush), over an :class:`Output`: a line
    that cannot be written is dropped and counted, never raised into the code that logs.

    The happy path is WriteLogger's plus one attribute read (this is every run's line): the
    ``try`` costs nothing until something raises, and a gone stream needs no test here, as
    its Output's ``write`` counts instead."""

    __slots__ = ("_out",)

    def __init__(self, out: Output) -> None:
        self._out = out

    def __repr__(self) -> str:
        return f"<LineLogger(file={self._out.stream!r})>"

    def msg(self, message: str) -> None:
        out = self._out
        with out.lock:
            try:
                out.write(message + "\n")
                out.flush()
            except (OSError, ValueError) as exc:  # BrokenPipeError is an OSError
                out.failed(exc)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class LineLoggerFactory:
    """structlog's ``logger_factory``: every logger for one stream shares its Output."""

    __slots__ = ("_out",)

    def __init__(self, stream: TextIO | None) -> None:
        self._out = _output(stream)

    def __call__(self, *args: Any) -> LineLogger:
        return LineLogger(self._out)


def _std_fds_open() -> None:
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
    """Flush stdout and stderr, whatever state they are in (before ``os._exit``)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # closed
        return False


# --------------------------------------------------------------------------- set-up


class _ToStructlog(logging.Handler):
    """Sends stdlib logging (asyncio, libraries) through the same renderer."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            method = getattr(logger, record.levelname.lower(), logger.info)
            kw: dict[str, Any] = {}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            method(record.getMessage(), **kw)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Log at ``level`` and above to ``stream`` (stdout): JSON for ``json``, or for ``auto``
    when the stream is not a terminal; console lines otherwise. Colours only on a terminal
    and without ``$NO_COLOR`` (no-color.org); the priority prefix only when the stream is
    the journal."""
    if stream is None:
        _std_fds_open()
        out = sys.stdout
    else:
        out = stream
    tty = _isatty(out)
    use_json = fmt == "json" or (fmt == "auto" and not tty)
    journal = is_journal(out)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if use_json:
        renderer = _JournalJSON() if journal else structlog.processors.JSONRenderer()
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            renderer,
        ]
    else:
        colors = tty and not os.environ.get("NO_COLOR")
        # No TimeStamper: the console's short local time is taken by the renderer itself.
        processors = [*shared, ConsoleLines(colors=colors, prefix=journal)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=LineLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ToStructlog):
            root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    root.setLevel(_LEVELS[level])
