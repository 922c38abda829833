"""structlog set-up: console lines on a terminal, one JSON object per line otherwise (journald).

When the output stream is systemd's journal, each line starts with its syslog priority
(``<3>`` for an error): journald strips the prefix and files the line at that level, so
``journalctl -p err`` and ``-p warning`` filter the daemon's lines.

Writing a line never raises: a line the output cannot take (stdout closed, the reader of a pipe
gone, a full disk) is dropped and counted (:func:`dropped_lines`). How lines reach the stream,
one write per event-loop iteration, is :mod:`taskd.log_output`."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from taskd.log_output import LineLogger, LineLoggerFactory, dropped_lines, flush_std_streams
from taskd.log_output import std_fds_open as _std_fds_open

__all__ = [
    "PRIORITY",
    "ConsoleLines",
    "JsonLines",
    "configure",
    "direct_json",
    "dropped_lines",
    "flush_std_streams",
    "is_journal",
    "utc_stamp",
]

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


# --------------------------------------------------------------------------- JSON

# The second whose text utc_stamp() holds, and that text up to the fraction's dot. One tuple,
# replaced whole, so that a thread never reads one second's number with another's text.
_stamp_second: tuple[int, str] = (-1, "")


def utc_stamp() -> str:
    """Now, in UTC, as ``2026-11-21T02:30:12.481234Z``: always six digits of fraction.

    What structlog's ``TimeStamper(fmt="iso", utc=True)`` writes, but the date and time are
    formatted once a second, not once a line. (That one leaves the fraction out when it is
    exactly zero; this never does, so the text sorts as the time does.)"""
    global _stamp_second
    ns = time.time_ns()
    second, nanos = divmod(ns, 1_000_000_000)
    known, text = _stamp_second
    if second != known:
        text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _stamp_second = (second, text)
    return f"{text}{nanos // 1000:06d}Z"


# structlog's map_method_name: the level a method logs at, where the names differ.
_LEVEL_OF_METHOD = {"warn": "warning", "exception": "error"}

# structlog's registry of the context variables bind_contextvars() ever made: while it is
# empty there is nothing to merge. Should a later structlog drop it, the fallback is not
# empty, and the merge always runs.
_contextvars: dict[str, Any] = getattr(structlog.contextvars, "_CONTEXT_VARS", {"?": None})


class JsonLines(structlog.processors.JSONRenderer):
    """The whole chain of processors for JSON lines in one call, byte for byte what
    ``merge_contextvars``, ``add_log_level``, ``TimeStamper(fmt="iso", utc=True)``,
    ``dict_tracebacks`` and ``JSONRenderer()`` write in turn: the same keys in the same
    order, the same serializer and fallback (``json`` with ``", "`` and ``": "``, non-ASCII
    escaped), so the lines that scripts grep for (``"event": "run"``) stay as they were.

    It is every run's line: one call instead of five, the time formatted once a second, the
    encoder made once, and a processor skipped when it would do nothing (no context
    variable bound, no ``exc_info``). With ``journal`` the line starts with its syslog
    priority.

    Not orjson: it renders a line about 2 µs faster (bench/logline.py --orjson), but writes
    no space after ``:`` and ``,`` and leaves non-ASCII unescaped, a different line format."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal
        # The encoder json.dumps(**kw) would build on every call, made once.
        self._encode = json.JSONEncoder(**self._dumps_kw).encode

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        if _contextvars:  # structlog registers every variable it ever bound here
            event_dict = structlog.contextvars.merge_contextvars(logger, name, event_dict)
        event_dict["level"] = _LEVEL_OF_METHOD.get(name, name)
        event_dict["timestamp"] = utc_stamp()
        if "exc_info" in event_dict:
            event_dict = structlog.processors.dict_tracebacks(logger, name, event_dict)
        if self.journal:
            return PRIORITY.get(name, _INFO) + self._encode(event_dict)
        return self._encode(event_dict)


# The methods a direct emitter serves: structlog's name for each, and the level it logs at.
_DIRECT_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

Emit = Callable[[str, str, dict[str, Any]], None]


def direct_json(log: Any) -> Emit | None:
    """For ``log`` (a bound logger :func:`configure` made for JSON lines, with no context
    bound): ``emit(method, event, fields)``, which writes what ``log.<method>(event,
    **fields)`` would, byte for byte, without structlog's own layers per call (the keyword
    arguments packed twice, the context copied, the chain looped over, the method looked up:
    about 1.5 µs of every run's line). ``fields`` becomes the line's dict and is not
    copied. None for any other logger (console lines, a plugin's configuration), whose
    caller logs as usual. A method below the configured level writes nothing, as there.

    The check is made once per logger: structlog.configure replaces a logger's chain with a
    new list, never in place, and taskd binds nothing to its run logger (re-checked per
    call all the same, as one dict's truth value)."""
    procs = getattr(log, "_processors", None)
    logger = getattr(log, "_logger", None)
    context = getattr(log, "_context", None)
    if not (
        isinstance(procs, list)
        and len(procs) == 1
        and type(procs[0]) is JsonLines
        and isinstance(logger, LineLogger)
        and isinstance(context, dict)
        and not context
        and callable(getattr(log, "is_enabled_for", None))
    ):
        return None
    render = procs[0]
    put = logger.msg
    enabled = frozenset(m for m, level in _DIRECT_LEVELS.items() if log.is_enabled_for(level))
    fallback = {m: getattr(log, m) for m in _DIRECT_LEVELS}

    def emit(method: str, event: str, fields: dict[str, Any]) -> None:
        if context or method not in enabled:  # bound since (or filtered): structlog's way
            fallback[method](event, **fields)
            return
        # As structlog's _process_event builds it: the fields in order, then the event.
        fields["event"] = event
        put(render(logger, method, fields))

    return emit


RunLine = Callable[[str, str, int, float, float], None]


def direct_run_line(log: Any) -> RunLine | None:
    """For ``log`` as :func:`direct_json` takes it, with info enabled: ``line(job, run_id,
    attempt, duration, late)``, which writes the commonest ``run`` line (succeeded, on
    schedule, no error, no result shown) byte for byte as ``emit("info", "run", fields)``
    would, formatted directly: the JSON encoder's walk over the dict is half of the line's
    cost. The caller passes a checked job name and a taskd run id (no character that JSON
    escapes) and two finite floats (``repr`` is what the encoder writes for those). None
    where :func:`direct_json` is None or info is filtered; structlog's way (``emit``) while
    any context is bound."""
    emit = direct_json(log)
    if emit is None or not log.is_enabled_for(logging.INFO):
        return None
    render = log._processors[0]
    put = log._logger.msg
    context = log._context
    prefix = PRIORITY["info"] if render.journal else ""

    def line(job: str, run_id: str, attempt: int, duration: float, late: float) -> None:
        if context or _contextvars:
            fields = {"job": job, "run_id": run_id, "attempt": attempt, "outcome": "succeeded"}
            emit("info", "run", {**fields, "duration": duration, "late": late})
            return
        put(
            f'{prefix}{{"job": "{job}", "run_id": "{run_id}", "attempt": {attempt}, '
            f'"outcome": "succeeded", "duration": {duration!r}, "late": {late!r}, '
            f'"event": "run", "level": "info", "timestamp": "{utc_stamp()}"}}'
        )

    return line


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
    if use_json:
        processors: list[Any] = [JsonLines(journal=journal)]
    else:
        colors = tty and not os.environ.get("NO_COLOR")
        # No TimeStamper: the console's short local time is taken by the renderer itself.
        processors = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            ConsoleLines(colors=colors, prefix=journal),
        ]
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
