"""The daemon's side of the wire to a worker (the format is in :mod:`taskd.run.worker`):
splitting the byte stream into frames, encoding a run's request, decoding its reply."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, cast

from taskd.errors import JobError, MemoryLimitExceeded, ResultTooLarge
from taskd.run import worker as _wire
from taskd.run.encoding import NO_RESULT, Encoded
from taskd.run.limits import describe, remember
from taskd.run.pool.records import Worker, mib

__all__ = [
    "Channel",
    "Encoder",
    "decode_error",
    "decode_memory",
    "decode_reply",
    "label_of",
    "measured",
]

_REF_CACHE_MAX = 1024
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_NO_ARGUMENTS = pickle.dumps(((), {}), _PROTOCOL)

FrameSink = Callable[[Worker, memoryview | bytes], None]


class Channel(asyncio.Protocol):
    """Splits a worker's byte stream into frames and hands each to ``on_frame``; reports a
    lost connection (end of file or error) to ``on_lost``."""

    __slots__ = ("_buf", "_on_frame", "_on_lost", "_worker")

    def __init__(
        self, worker: Worker, on_frame: FrameSink, on_lost: Callable[[Worker], None]
    ) -> None:
        self._worker = worker
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._worker.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        header = _wire.HEADER
        hsize = header.size
        if not self._buf:
            # Common case: whole small frames in one read; parse them without copying.
            pos, size = 0, len(data)
            view = memoryview(data)
            while size - pos >= hsize:
                (length,) = header.unpack_from(data, pos)
                end = pos + hsize + length
                if end > size:
                    break
                self._on_frame(self._worker, view[pos + hsize : end])
                pos = end
            if pos < size:
                self._buf += view[pos:]
            return
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= hsize:
            (length,) = header.unpack_from(buf, pos)
            end = pos + hsize + length
            if end > len(buf):
                break
            # A copy: a view would pin the bytearray and forbid trimming it below.
            self._on_frame(self._worker, bytes(buf[pos + hsize : end]))
            pos = end
        if pos:
            del buf[:pos]

    def eof_received(self) -> bool | None:
        self._on_lost(self._worker)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(self._worker)


def _reference(func: Callable[..., Any]) -> bytes:
    """The pickled ``(module, qualname, file, version)`` naming ``func``, or b"" to send it
    by value.

    By reference, because a function defined in a drop-in file (loaded by path under a
    synthetic module name) cannot be found by plain pickle in the worker; the file path lets
    the worker load it the same way. ``version`` identifies the module's namespace in this
    process, so a worker notices when the parent has loaded the file again.
    """
    if not isinstance(func, types.FunctionType | types.BuiltinFunctionType | type):
        return b""  # partials, bound methods, callable instances: pickle handles them
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return b""  # lambdas and nested functions: pickling them raises a clear error
    path = getattr(sys.modules.get(module), "__file__", None)
    version = None
    if isinstance(func, types.FunctionType):
        version = id(func.__globals__)
        filename = func.__code__.co_filename
        if path is None and not filename.startswith("<"):
            path = filename
    return pickle.dumps((module, qualname, path, version), _PROTOCOL)


def label_of(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a callable: a run's label when the caller gave none."""
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module else str(name)


class Encoder:
    """Builds request frames; remembers each callable's reference, since a pool runs the
    same few functions many times."""

    def __init__(self) -> None:
        # callable -> (its reference for the worker, its default label)
        self._refs: dict[Any, tuple[bytes, str]] = {}

    def encode(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        max_memory: int | None = None,
        max_pickle: int | None = None,
        max_json: int | None = None,
    ) -> tuple[bytes, str]:
        """The request frame for one run, and the label to use when the caller gave none."""
        try:
            cached = self._refs.get(func)
        except TypeError:  # an unhashable callable
            cached = None
        if cached is None:
            cached = (_reference(func), label_of(func))
            if len(self._refs) >= _REF_CACHE_MAX:
                self._refs.clear()
            with contextlib.suppress(TypeError):  # unhashable: just not cached
                self._refs[func] = cached
        ref, label = cached
        if ref and not args and not kwargs:
            payload = _NO_ARGUMENTS  # a cpu job without options: the same bytes every run
        elif ref:
            payload = pickle.dumps((args, dict(kwargs) if kwargs else {}), _PROTOCOL)
        else:
            payload = pickle.dumps((func, args, dict(kwargs) if kwargs else {}), _PROTOCOL)
        head = _wire.REQUEST.pack(max_memory or 0, max_pickle or 0, max_json or 0, len(ref))
        size = len(head) + len(ref) + len(payload)
        frame = b"".join((_wire.HEADER.pack(size), head, ref, payload))
        return frame, label


def decode_reply(
    pid: int, label: str, frame: memoryview | bytes
) -> tuple[Any, BaseException | None]:
    """The outcome of a run's reply ``frame`` (not a MEMORY one) from worker ``pid``, as
    ``(value, None)`` or ``(None, exception)``."""
    try:
        kind = frame[0]
        if kind == _wire.MEASURED:
            return measured(pickle.loads(frame[1:])), None
        if kind == _wire.OK:
            return pickle.loads(frame[1:]), None
        if kind == _wire.TOO_BIG:
            return None, ResultTooLarge(f"{label}: {pickle.loads(frame[1:])}")
        return None, decode_error(pid, label, frame[1:])
    except BaseException as exc:  # whatever unpickling runs, it is this run's failure
        why = f"the reply from worker process {pid} could not be unpickled in the daemon"
        return None, JobError(f"{label}: {why}: {describe(exc)}")


def measured(body: tuple[Any, ...]) -> tuple[Any, Encoded]:
    """A ``MEASURED`` reply's ``(result, *Encoded)`` as ``(result, Encoded)``. The stored
    form travels as a plain tuple: a NamedTuple's pickle names its class, and unpickling
    that costs three times as much, on every cpu run."""
    result, stored, text, serialisable, size = body
    if text is None:
        return result, NO_RESULT
    return result, Encoded(stored, text, serialisable, size)


def decode_memory(
    pid: int, label: str, limit: int, body: memoryview | bytes
) -> MemoryLimitExceeded:
    """The exception for a ``MEMORY`` reply of worker ``pid`` running ``label`` with
    ``max_memory`` = ``limit``."""
    summary, text = pickle.loads(body)
    exc = MemoryLimitExceeded(
        f"{label}: an allocation failed at max_memory={limit} bytes ({mib(limit)}), "
        f"the limit set on worker process {pid}'s data segment (RLIMIT_DATA) for "
        f"this run ({summary}); the worker is being replaced"
    )
    exc.add_note(f"Remote traceback (worker process {pid}, {label}):\n{text}")
    return exc


def decode_error(pid: int, label: str, body: memoryview | bytes) -> BaseException:
    """The exception to raise for an ``ERROR`` reply of worker ``pid`` running ``label``."""
    blob, summary, text = pickle.loads(body)
    note = f"Remote traceback (worker process {pid}, {label}):\n{text.rstrip()}" if text else ""
    exc: object = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None  # e.g. an __init__ that does not accept its own args back
    # SystemExit, KeyboardInterrupt and the like would stop the daemon's loop if raised
    # in it, and a future refuses StopIteration: those travel as JobError.
    if isinstance(exc, Exception) and not isinstance(exc, StopIteration):
        exc.add_note(note)
        # The worker made this text within bounds: the daemon records it rather than call
        # str() on an exception whose small pickle may stand for a gigabyte of text.
        remember(exc, summary)
        return exc
    err = JobError(summary)
    if note:
        err.add_note(note)
    if isinstance(exc, BaseException):
        err.__cause__ = exc
    return err
