"""What a dask worker runs for one taskd run: the job function (shipped as a cloudpickle
blob), then the reply the local pool's workers send (taskd.run.replies): the result
measured against max_result_size and encoded where it ran, or the error described there.

Imported on the workers (by reference: taskd must be installed there), so it keeps to
what a pool worker imports."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

from taskd.run.encoding import transport_bound
from taskd.run.replies import TOO_BIG, error_reply, reply_for

# blob -> the function it unpickles to: a worker runs the same few jobs many times, and
# unpickling a function (its module by value) costs far more than a dict lookup.
_funcs: dict[bytes, Callable[..., Any]] = {}
_FUNCS_MAX = 256


def call(blob: bytes, kwargs: Mapping[str, Any], max_json: int) -> tuple[int, bytes]:
    """Run one attempt; never raises (a job's SystemExit too becomes its error reply).
    Returns (this worker's pid, the reply as taskd.run.pool.channel.decode_reply reads it)."""
    try:
        func = _funcs.get(blob)
        if func is None:
            import cloudpickle

            func = cloudpickle.loads(blob)
            if len(_funcs) >= _FUNCS_MAX:
                _funcs.clear()
            _funcs[blob] = func
        result = func(**kwargs)
    except BaseException as exc:
        return os.getpid(), error_reply(exc)
    kind, error, summary, body = reply_for(result, transport_bound(max_json), max_json)
    del result
    if body is not None:
        return os.getpid(), bytes((kind,)) + body
    if error is None:  # too big: nothing was raised
        return os.getpid(), bytes((TOO_BIG,)) + pickle.dumps(summary)
    return os.getpid(), error_reply(error, summary=summary, send_exception=summary is None)


def executing(key: str, dask_worker: Any) -> int | None:
    """This worker's pid if its thread runs ``key`` now, else None (it waits in the queue,
    or it ended). The daemon asks (``client.run``) when it gives up on a run."""
    task = dask_worker.state.tasks.get(key)
    if task is not None and task.state in ("executing", "long-running"):
        return os.getpid()
    return None


def version() -> str:
    """taskd's version on a worker (a remote cluster must run the daemon's)."""
    from taskd._version import __version__

    return __version__
