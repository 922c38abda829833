"""structlog set-up: console lines on a terminal, one JSON object per line otherwise (journald).

When the output stream is systemd's journal, each line starts with its syslog priority
(``<3>`` for an error): journald strips the prefix and files the line at that level, so
``journalctl -p err`` and ``-p warning`` filter the daemon's lines."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
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
    out = stream or sys.stdout
    tty = out.isatty()
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
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ToStructlog):
            root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    root.setLevel(_LEVELS[level])
