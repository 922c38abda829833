"""The ``dask`` executor (bundled; extra ``taskd[dask]``): cpu jobs on a Dask distributed
cluster, ``[dask] scheduler = "tcp://host:port"``, or ``"local"`` for a LocalCluster that
taskd starts in a helper process (dask_local). The daemon holds only an asynchronous
Client on its own loop; distributed is imported when the executor starts, so only a daemon
with a dask job ever imports it.

A run is one task: ``dask_call.call(blob, kwargs, max_result)``. The function travels by
value, as a cloudpickle blob made once per function (a drop-in file's module is loaded
under a synthetic name no worker can import), and its result comes back encoded and
measured as the local pool's do (taskd.run.replies), so history, shared state and limits
treat both alike.

Dask cannot stop a running task: cancelling one releases its key while its thread runs
on. With ``local`` taskd restarts the worker holding a timed-out or cancelled run (one
thread per worker: only that run is lost); a remote cluster's workers are shared and are
not restarted: the run ends timed out or cancelled while its task may run to its end,
counted in ``taskd_dask_orphaned_total``."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from taskd.errors import JobTimeout, WorkerDied
from taskd.plugin.dropin import PREFIX as DROPIN_PREFIX
from taskd.run.encoding import Encoded
from taskd.run.executor._base import Call, ExecutorSettings, Problem
from taskd.run.executor.dask_helper import DaskUnavailable, LocalHelper
from taskd.run.executor.dask_settings import read_settings
from taskd.run.executors import with_timeout
from taskd.run.pool.channel import decode_reply

if TYPE_CHECKING:
    from taskd.config.model import JobConfig
    from taskd.plugin.jobtype import JobType, Kind

log = structlog.get_logger("taskd.dask")

CLOSE_TIMEOUT = 10.0  # seconds the helper gets to close its cluster at the stop
KILL_CLOSE_TIMEOUT = 2.0  # the same for a stop that kills (a second signal, say)
_BLOBS_MAX = 256


class DaskExecutor:
    name: ClassVar[str] = "dask"
    kinds: ClassVar[frozenset[Kind]] = frozenset({"cpu"})

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings, _ = read_settings(settings.table, settings.process_workers)
        self.client: Any = None  # distributed.Client (asynchronous), once started
        self.helper: LocalHelper | None = None
        self.orphaned = 0  # runs given up on whose task may still run (remote cluster)
        self._blobs: dict[Callable[..., Any], bytes] = {}
        self._inflight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()
        self._killed_worker: type[BaseException] = _Never
        self._cancelled: type[BaseException] = _Never

    # -- load-time checks ------------------------------------------------------------------

    @classmethod
    def check_table(cls, table: Mapping[str, Any]) -> list[Problem]:
        return read_settings(table, 1)[1]

    @classmethod
    def validate(cls, job: JobConfig, jobtype: JobType) -> list[Problem]:
        problems: list[Problem] = []
        if find_spec("distributed") is None:
            problems.append(
                (
                    "executor",
                    "the dask executor needs the distributed package, which is not installed",
                    "pip install 'taskd[dask]'",
                )
            )
        if job.max_memory is not None:
            problems.append(
                (
                    "max_memory",
                    "max_memory is not supported by the dask executor: a dask worker's "
                    "memory is the cluster's to limit (its workers' memory_limit)",
                    'remove max_memory, or run the job on executor = "process"',
                )
            )
        return problems

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.client is not None:
            return
        s = self.settings
        # distributed's import takes a few hundred ms: in a thread, off the loop.
        distributed = await asyncio.to_thread(_import_distributed)
        self._killed_worker = distributed.scheduler.KilledWorker
        self._cancelled = distributed.client.FutureCancelledError
        address = s.scheduler
        if s.local:
            self.helper = await LocalHelper.start(s.workers)
            address = self.helper.address
        try:
            self.client = await distributed.Client(
                address,
                asynchronous=True,
                set_as_default=False,
                timeout=s.connect_timeout,
                name=f"taskd-{address}",
            )
        except Exception as exc:
            await self._close_helper()
            raise DaskUnavailable(f"dask scheduler {address} unreachable: {_text(exc)}") from None
        if not s.local:
            await self._check_versions()
        log.info("dask_connected", scheduler=address)

    async def _check_versions(self) -> None:
        """A remote cluster's workers must run this taskd (they import taskd.run.executor
        .dask_call): a mismatch fails the start, so the runs fail saying so."""
        from taskd._version import __version__
        from taskd.run.executor import dask_call

        try:
            found = await self.client.run(dask_call.version)
        except Exception as exc:
            await self.close(kill=True, timeout=0)
            raise DaskUnavailable(
                f"dask workers at {self.settings.scheduler} cannot run taskd's calls "
                f"(is taskd {__version__} installed on them?): {_text(exc)}"
            ) from None
        wrong = {w: v for w, v in found.items() if v != __version__}
        if wrong:
            await self.close(kill=True, timeout=0)
            raise DaskUnavailable(
                f"dask workers run another taskd than this daemon ({__version__}): {wrong}"
            )

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        for task in list(self._tasks):  # worker restarts still under way
            task.cancel()
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5.0)
        # Even when killing: a moment to close cleanly, so the workers' scratch folders go.
        await self._close_helper(KILL_CLOSE_TIMEOUT if kill else CLOSE_TIMEOUT)

    async def _close_helper(self, timeout: float = CLOSE_TIMEOUT) -> None:
        helper, self.helper = self.helper, None
        if helper is not None:
            await helper.close(timeout)

    def gauges(self) -> Mapping[str, float]:
        client = self.client
        up = client is not None and client.status == "running"
        info = client.scheduler_info() if up else {}
        return {
            "up": 1.0 if up else 0.0,
            "workers": float(info.get("n_workers", 0)),
            "threads": float(info.get("total_threads", 0)),
            "processing": float(self._inflight),
            "orphaned_total": float(self.orphaned),
        }

    # -- runs ------------------------------------------------------------------------------

    async def _client(self) -> Any:
        """The client, after starting anew if the local cluster's helper has died (killed
        from outside, say): its runs would otherwise fail for good."""
        helper = self.helper
        if self.client is not None and (helper is None or helper.proc.returncode is None):
            return self.client
        async with self._lock:
            helper = self.helper
            if helper is not None and helper.proc.returncode is not None:
                log.warning("dask_local_lost", pid=helper.pid, status=helper.proc.returncode)
                await self.close(kill=True, timeout=0)
            if self.client is None:
                await self.start()
        return self.client

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        client = await self._client()
        if client.status != "running":
            raise DaskUnavailable(
                f"dask scheduler {self.settings.scheduler} unreachable: the client is "
                f"{client.status}"
            )
        from taskd.run.executor import dask_call

        key = f"taskd-{call.key}"
        fut = client.submit(
            dask_call.call,
            self._blob(call.func),
            dict(call.kwargs),
            call.max_result,
            key=key,
            pure=False,
            retries=0,
        )
        self._inflight += 1
        try:
            pid, reply = await with_timeout(fut, call.timeout, call.label)
        except (JobTimeout, asyncio.CancelledError) as exc:
            why = "timed out" if isinstance(exc, JobTimeout) else "cancelled"
            self._spawn(self._give_up(fut, key, f"{call.label} {why}"))
            raise
        except self._killed_worker as exc:
            last = getattr(exc, "last_worker", None)  # a WorkerState
            worker = getattr(last, "address", None) or "?"
            raise WorkerDied(f"{call.label}: dask worker {worker} died running it") from None
        except self._cancelled as exc:  # not ours: the scheduler dropped it
            raise DaskUnavailable(
                f"dask scheduler {self.settings.scheduler} unreachable: the task was "
                f"cancelled by the cluster ({_text(exc)})"
            ) from None
        except OSError as exc:  # CommClosedError is one
            raise DaskUnavailable(
                f"dask scheduler {self.settings.scheduler} unreachable: {_text(exc)}"
            ) from None
        finally:
            self._inflight -= 1
        # Its result is here now: the cluster need not keep it (nor recompute it elsewhere
        # when the worker that holds it goes away).
        fut.release()
        value, error = decode_reply(pid, call.label, reply)
        if error is not None:
            raise error
        result: tuple[Any, Encoded] = value
        return result

    def _blob(self, func: Callable[..., Any]) -> bytes:
        """``func`` pickled by value, once (a reloaded drop-in is a new function object)."""
        blob = self._blobs.get(func)
        if blob is None:
            import cloudpickle

            module = _module_of(func)
            by_value = module is not None and module.__name__.startswith(DROPIN_PREFIX)
            if by_value:
                cloudpickle.register_pickle_by_value(module)
            try:
                blob = cloudpickle.dumps(func)
            finally:
                if by_value:
                    cloudpickle.unregister_pickle_by_value(module)
            if len(self._blobs) >= _BLOBS_MAX:
                self._blobs.clear()
            self._blobs[func] = blob
        return blob

    async def _give_up(self, fut: Any, key: str, why: str) -> None:
        """After a timeout or a cancel: drop the task, and with ``local`` restart the worker
        running it (its thread cannot be stopped otherwise); with a remote cluster leave
        its workers alone and count the task as orphaned if it was running."""
        client = self.client
        if client is None:
            return
        try:
            processing: Mapping[str, Any] = await client.processing()
            holders = [w for w, keys in processing.items() if key in keys]
            await client.cancel([fut], reason=why, force=True)
            if not holders:
                return  # it had not started (or had just ended): nothing runs on
            if self.helper is None:
                self.orphaned += 1
                log.warning("dask_task_orphaned", key=key, workers=holders, reason=why)
                return
            log.info("dask_worker_restart", key=key, workers=holders, reason=why)
            await client.restart_workers(holders, raise_for_error=False)
        except Exception as exc:  # the cluster went away meanwhile: nothing left to stop
            log.warning("dask_give_up_failed", key=key, error=_text(exc))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Never(Exception):
    """Stands for distributed's exception classes until it is imported."""


def _import_distributed() -> Any:
    import distributed
    import distributed.client
    import distributed.scheduler

    return distributed


def _module_of(func: Callable[..., Any]) -> types.ModuleType | None:
    import sys

    name = getattr(func, "__module__", None)
    return sys.modules.get(name) if isinstance(name, str) else None


def _text(exc: BaseException) -> str:
    from taskd.run.limits import describe

    return describe(exc, 500)
