"""What a pool worker sends back for one run (see :mod:`taskd.run.worker` for the wire):
the result, measured against the run's limits, or the error, described within bounds. Every
text that crosses the pipe is cut here, in the worker, so the daemon never receives (nor
builds) a big one. (Standard library and cheap modules only: the forkserver preloads this.)"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from taskd.run.encoding import TooLarge, encode, size_text, too_large
from taskd.run.limits import MAX_ERROR_TEXT, MAX_REMOTE_TEXT, describe, has_big_args
from taskd.run.limits import cut as _cut

# An exception whose pickle is bigger travels as its (cut) text only: a 5 MB exception message
# must not cross the pipe, let alone reach the log.
MAX_ERROR_PICKLE = 65_536

# Reply kinds: the first byte of a reply.
READY = 0
OK = 1
ERROR = 2
MEMORY = 3
TOO_BIG = 4
MEASURED = 5


def reply_for(
    result: Any, max_pickle: int, max_json: int
) -> tuple[int, BaseException | None, str | None, bytes | None]:
    """(reply kind, error, summary, body) for a run that returned ``result``: a body to send,
    or no body and the error (None: too big) with its summary."""
    what = type(result).__qualname__
    reply: Any = result
    kind = OK
    size = ""
    if max_json:
        try:
            encoded = encode(result, max_json)
        except TooLarge as over:
            return TOO_BIG, None, too_large(what, over.size, over.exact, max_json), None
        except BaseException as exc:
            why = f"the result ({what}) could not be turned into JSON text: {describe(exc)}"
            return TOO_BIG, exc, why, None
        # The stored form is the result itself when it is JSON: pickle sends it once. A
        # plain tuple, not the Encoded itself (see pool.channel.measured).
        reply, kind = (result, *encoded), MEASURED
        size = f" (its JSON text: {encoded.size} bytes)"
    try:
        body = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        return kind, exc, f"the result ({what}) could not be pickled: {describe(exc)}", None
    if not max_pickle or len(body) <= max_pickle:
        return kind, None, None, body
    if max_json:
        why = (
            f"the result ({what}) is {len(body)} bytes pickled{size}, over the "
            f"{size_text(max_pickle)} a cpu job's result may take on its way to the daemon "
            f"(2 x max_result_size + 64 KiB); return plain data, or less"
        )
    else:
        why = (
            f"the result ({what}) is {len(body)} bytes pickled, over max_result_size="
            f"{size_text(max_pickle)}; return less (write big output to a file and return "
            f"its path) or raise [daemon] max_result_size"
        )
    return kind, None, why, None


def cut(text: str) -> str:
    return _cut(text, MAX_REMOTE_TEXT)


def memory_reply(exc: BaseException) -> bytes:
    summary = describe(exc, MAX_ERROR_TEXT - 512)
    return bytes((MEMORY,)) + pickle.dumps((summary, cut(_format_traceback(exc))))


def error_reply(
    exc: BaseException, *, summary: str | None = None, send_exception: bool = True
) -> bytes:
    text = cut(_format_traceback(exc))
    blob: bytes | None = None
    if send_exception:
        try:
            blob = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
        except BaseException:
            blob = None  # the parent reports it as a JobError with the same text
        if blob is not None and len(blob) > MAX_ERROR_PICKLE:
            blob = None  # a huge message, say: its (cut) text is enough
    # The message is cut a little short of what the daemon records, so its own prefix (the
    # exception type) does not make it cut again, with a marker that undercounts.
    body = (blob, _cut(summary, MAX_ERROR_TEXT - 256) if summary else _describe(exc), text)
    try:
        return bytes((ERROR,)) + pickle.dumps(body, pickle.HIGHEST_PROTOCOL)
    except BaseException:
        # A str subclass with odd pickling, say; plain strings always pickle.
        return bytes((ERROR,)) + pickle.dumps((None, str(body[1]), str(text)))


def _describe(exc: BaseException) -> str:
    # Cut a little short of what the daemon records (MAX_ERROR_TEXT), once, so the daemon
    # never cuts it again with a marker that undercounts.
    return describe(exc, MAX_ERROR_TEXT - 256)


def _format_traceback(exc: BaseException) -> str:
    """The traceback as Python prints it; abridged messages (see limits.describe) when an
    exception in the chain has big arguments, whose full text would be built first."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(chain) < 32:
        seen.add(id(link))
        chain.append(link)
        link = link.__cause__ or link.__context__
    try:
        if not any(has_big_args(e) for e in chain):
            return "".join(traceback.format_exception(exc))
        parts = [
            "".join(traceback.format_tb(e.__traceback__)) + describe(e, MAX_REMOTE_TEXT) + "\n"
            for e in reversed(chain)
        ]
        return "\nDuring handling of the above exception, another exception occurred:\n\n".join(
            f"Traceback (most recent call last):\n{part}" for part in parts
        )
    except BaseException:
        return f"<traceback could not be formatted> {_describe(exc)}\n"
