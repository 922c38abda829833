"""The executor seam: what runs a blocking or cpu job's function, named so a job can pick one
(``executor = "…"``) and a plugin can add one (the ``taskd_executors`` hook).

io runs are no executor's: the runner awaits them inline on the loop (the fused path
depends on it). The built-ins are ``thread`` (blocking) and ``process`` (cpu); a job whose
executor is its kind's default never goes through :class:`Executor.run` at all (the
runner keeps its direct calls), so the seam costs the default runs nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from taskd.config.model import JobConfig
    from taskd.plugin.jobtype import JobType, Kind
    from taskd.run.encoding import Encoded

# (key, message, hint): one problem with a job's or a table's settings, its key relative to
# that job's table (``max_memory``) or to the executor's own table (``scheduler``).
Problem = tuple[str, str, str | None]


@dataclass(frozen=True, slots=True)
class Call:
    """One attempt of a run, as an executor gets it."""

    func: Callable[..., Any]
    kwargs: Mapping[str, Any]
    timeout: float | None
    max_memory: int | None
    max_result: int  # bytes of the result's stored form (taskd.run.encoding.encode)
    label: str  # "job 'j' run r": what its errors and log lines say
    key: str  # unique per attempt ("<run_id>-<attempt>")


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """What an executor is made with: its table from the config (``[executors.<name>]``, or
    the table it registered, e.g. ``[dask]``; empty when absent) and the daemon's sizes."""

    table: Mapping[str, Any] = field(default_factory=dict)
    thread_workers: int = 8
    thread_workers_max: int = 0
    process_workers: int = 1


class Executor(Protocol):
    """Runs attempts of one kind of job somewhere other than the loop.

    ``run`` raises as the local pools do: :class:`taskd.errors.JobTimeout` when
    ``call.timeout`` passes, the job's own exception (its text made where it ran) when it
    raised, a :class:`taskd.errors.JobError` subclass when the executor failed it."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[Kind]]

    def __init__(self, settings: ExecutorSettings) -> None:
        """Cheap: nothing starts until :meth:`start`."""

    @classmethod
    def check_table(cls, table: Mapping[str, Any]) -> list[Problem]:
        """Problems with the executor's config table (load time; keys relative to it)."""
        ...

    @classmethod
    def validate(cls, job: JobConfig, jobtype: JobType) -> list[Problem]:
        """Problems with a job that names this executor (load time; keys relative to the
        job's table), e.g. an option this executor cannot honour."""
        ...

    async def start(self) -> None:
        """Get ready to run; idempotent (a lazy executor starts on its first run)."""
        ...

    async def run(self, call: Call) -> tuple[Any, Encoded]:
        """One attempt: the result and its stored form, measured where it ran."""
        ...

    async def close(self, *, kill: bool, timeout: float | None) -> None:
        """Stop: let runs end for up to ``timeout`` seconds (``kill``: at once)."""
        ...

    def gauges(self) -> Mapping[str, float]:
        """Figures for /metrics and status (name -> value), cheap to read."""
        ...
