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

A run that times out or is cancelled gives its task up (dask_giveup: on ``local`` the
worker running it is killed, and only that one); the runs whose tasks waited on that
worker are sent again, not failed."""

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
from taskd.run.executor.dask_giveup import GiveUp
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
MAX_RESENT = 3  # times a run's task is sent again after taskd killed the worker it waited on
# A Client's states other than closing or closed for good ("connecting": it reconnects).
_ALIVE = frozenset({"newly-created", "connecting", "running"})


class DaskExecutor:
    name: ClassVar[str] = "dask"
    kinds: ClassVar[frozenset[Kind]] = frozenset({"cpu"})

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings, _ = read_settings(settings.table, settings.process_workers)
        self.client: Any = None  # distributed.Client (asynchronous), once started
        self.helper: LocalHelper | None = None
        self.given_up = GiveUp()
        self._blobs: dict[Callable[..., Any], bytes] = {}
        self._inflight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()
        self._starting: asyncio.Task[None] | None = None
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
        """Start the local cluster (``local``) and connect. One start at a time, in a task
        of the executor's own that every caller waits for: a run cancelled or timed out
        while it waits leaves the start to go on for the next run (a cluster half started
        and forgotten would run until taskd exits), and :meth:`close` ends it."""
        if self.client is not None:
            return
        task = self._starting
        if task is None:
            task = self._starting = asyncio.ensure_future(self._start())
            task.add_done_callback(self._started)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and me is not None and me.cancelling() == 0:
                # close() ended the start, not a cancel of ours: the run fails, saying so.
                raise DaskUnavailable(
                    f"dask scheduler {self.settings.scheduler}: its start was stopped "
                    "(taskd is stopping)"
                ) from None
            raise

    def _started(self, task: asyncio.Task[None]) -> None:
        if self._starting is task:
            self._starting = None  # after a failure, the next run starts anew
        if not task.cancelled():
            task.exception()  # its callers have it (or none waits any more): retrieved

    async def _start(self) -> None:
        s = self.settings
        # distributed's import takes a few hundred ms: in a thread, off the loop.
        distributed = await asyncio.to_thread(_import_distributed)
        self._killed_worker = distributed.scheduler.KilledWorker
        self._cancelled = distributed.client.FutureCancelledError
        address = s.scheduler
        if s.local:
            await self._close_helper(KILL_CLOSE_TIMEOUT)  # a dead one's leftovers, if any
            self.helper = await LocalHelper.start(s.workers)  # ends its own on a cancel
            address = self.helper.address
        client = distributed.Client(
            address,
            asynchronous=True,
            set_as_default=False,
            timeout=s.connect_timeout,
            name=f"taskd-{address}",
        )
        try:
            # The Client's own timeout bounds the TCP connect only: a scheduler that
            # accepts and never answers would hold the start (and every run) for good.
            # A second more, so that the Client's own error (refused, say) comes first.
            await asyncio.wait_for(self._connect(client), s.connect_timeout + 1.0)
        except BaseException as exc:  # a cancel (close() during the start) too
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5.0)
            await self._close_helper(KILL_CLOSE_TIMEOUT)
            if isinstance(exc, DaskUnavailable) or not isinstance(exc, Exception):
                raise
            why = (
                f"no answer within {s.connect_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else _text(exc)
            )
            raise DaskUnavailable(f"dask scheduler {address} unreachable: {why}") from None
        self.client = client
        log.info("dask_connected", scheduler=address)

    async def _connect(self, client: Any) -> None:
        """Connect; a remote cluster's workers must run this taskd (they import
        taskd.run.executor.dask_call): a mismatch fails the start, so the runs fail saying
        so."""
        await client
        if self.settings.local:
            return
        from taskd._version import __version__
        from taskd.run.executor import dask_call

        try:
            found = await client.run(dask_call.version)
        except Exception as exc:
            raise DaskUnavailable(
                f"dask workers at {self.settings.scheduler} cannot run taskd's calls "
                f"(is taskd {__version__} installed on them?): {_text(exc)}"
            ) from None
        wrong = {w: v for w, v in found.items() if v != __version__}
        if wrong:
            raise DaskUnavailable(
                f"dask workers run another taskd than this daemon ({__version__}): {wrong}"
            )

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        for task in list(self._tasks):  # worker restarts still under way
            task.cancel()
        starting = self._starting
        if starting is not None:  # its cancel ends what it started (_start cleans up)
            starting.cancel()
            await asyncio.wait([starting])
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
            "orphaned_total": float(self.given_up.orphaned),
        }

    # -- runs ------------------------------------------------------------------------------

    async def _client(self) -> Any:
        """The client, after starting anew if the local cluster's helper has died (killed
        from outside, say) or the client has closed for good (it stops reconnecting to a
        scheduler gone for longer than connect_timeout): its runs would otherwise fail for
        good. A client still reconnecting is kept: its runs fail until it is back."""
        client, helper = self.client, self.helper
        if (
            client is not None
            and client.status in _ALIVE
            and (helper is None or helper.proc.returncode is None)
        ):
            return client
        async with self._lock:
            client, helper = self.client, self.helper
            if helper is not None and helper.proc.returncode is not None:
                log.warning("dask_local_lost", pid=helper.pid, status=helper.proc.returncode)
                await self.close(kill=True, timeout=0)
            elif client is not None and client.status not in _ALIVE:
                log.warning(
                    "dask_client_closed", scheduler=self.settings.scheduler, status=client.status
                )
                await self.close(kill=True, timeout=0)
        # Outside the lock: runs waiting at once share one start, and its failure.
        await self.start()
        client = self.client
        if client is None:  # closed meanwhile (the stop)
            raise DaskUnavailable(f"dask scheduler {self.settings.scheduler}: taskd is stopping")
        return client

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        sent = _Sent()
        self._inflight += 1
        try:
            # The run's timeout covers getting the client too (a restart of the cluster).
            pid, reply = await with_timeout(self._send(call, sent), call.timeout, call.label)
        except (JobTimeout, asyncio.CancelledError) as exc:
            if sent.fut is not None:
                why = "timed out" if isinstance(exc, JobTimeout) else "cancelled"
                self._spawn(self._give_up(sent.fut, sent.key, f"{call.label} {why}"))
            raise
        finally:
            self._inflight -= 1
        value, error = decode_reply(pid, call.label, reply)
        if error is not None:
            raise error
        result: tuple[Any, Encoded] = value
        return result

    async def _send(self, call: Call, sent: _Sent) -> tuple[int, bytes]:
        """Submit the attempt and await its reply. A task that waited on a worker taskd
        killed (to stop another run's task) never started: it is sent again, as the same
        attempt, rather than failing a run that did nothing wrong."""
        client = await self._client()
        if client.status != "running":
            raise DaskUnavailable(
                f"dask scheduler {self.settings.scheduler} unreachable: the client is "
                f"{client.status}"
            )
        from taskd.run.executor import dask_call

        blob = self._blob(call.func)
        key = f"taskd-{call.key}"
        for resent in range(1, MAX_RESENT + 2):
            fut = sent.fut = client.submit(
                dask_call.call,
                blob,
                dict(call.kwargs),
                call.max_result,
                key=key,
                pure=False,
                retries=0,
            )
            sent.key = key
            try:
                reply: tuple[int, bytes] = await fut
            except self._killed_worker as exc:
                last = getattr(exc, "last_worker", None)  # a WorkerState
                worker = getattr(last, "address", None) or "?"
                fut.release()
                if worker not in self.given_up.killed or resent > MAX_RESENT:
                    raise WorkerDied(
                        f"{call.label}: dask worker {worker} died running it"
                    ) from None
                log.info("dask_task_resent", key=key, worker=worker)
                key = f"taskd-{call.key}-r{resent}"
                continue
            except self._cancelled as exc:  # not ours: the scheduler dropped it
                raise DaskUnavailable(
                    f"dask scheduler {self.settings.scheduler} unreachable: the task was "
                    f"cancelled by the cluster ({_text(exc)})"
                ) from None
            except OSError as exc:  # CommClosedError is one
                raise DaskUnavailable(
                    f"dask scheduler {self.settings.scheduler} unreachable: {_text(exc)}"
                ) from None
            # Its result is here now: the cluster need not keep it (nor recompute it
            # elsewhere when the worker that holds it goes away).
            fut.release()
            return reply
        raise AssertionError("unreachable")  # the loop returns or raises

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
        client = self.client
        if client is not None:
            helper = self.helper
            await self.given_up.stop(client, fut, key, why, helper.pid if helper else None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Sent:
    """The task a run has in the cluster now, for giving it up."""

    __slots__ = ("fut", "key")

    def __init__(self) -> None:
        self.fut: Any = None
        self.key = ""


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
