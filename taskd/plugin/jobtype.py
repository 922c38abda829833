"""JobType: what a plugin registers, a named function plus the executor kind that runs it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["io", "blocking", "cpu"]
KINDS: tuple[Kind, ...] = ("io", "blocking", "cpu")


@dataclass(frozen=True, slots=True)
class JobType:
    """A job type a plugin offers.

    ``func`` is called with the job's ``options`` table as keyword arguments:

    - ``kind="io"``: an ``async def`` whose first parameter is a :class:`taskd.JobContext`;
      it runs on the event loop.
    - ``kind="blocking"``: a plain function, run in the thread pool.
    - ``kind="cpu"``: a plain module-level function, run in the process pool. Its arguments
      and return value must be picklable.
    """

    name: str
    func: Callable[..., Any]
    kind: Kind = "io"
    description: str = ""
    # Filled in by the plugin host: where the job type came from (file path or entry point).
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"JobType name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(
                f"JobType {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )
        if not callable(self.func):
            raise TypeError(f"JobType {self.name!r}: func must be callable, got {self.func!r}")
        is_async = inspect.iscoroutinefunction(self.func)
        if self.kind == "io" and not is_async:
            raise TypeError(
                f"JobType {self.name!r}: kind='io' needs an 'async def' function; "
                f"use kind='blocking' for a plain function"
            )
        if self.kind != "io" and is_async:
            raise TypeError(
                f"JobType {self.name!r}: an 'async def' function must use kind='io', "
                f"not {self.kind!r}"
            )
        qualname = getattr(self.func, "__qualname__", "")
        if self.kind == "cpu" and ("<locals>" in qualname or qualname == "<lambda>"):
            raise TypeError(
                f"JobType {self.name!r}: a cpu job's function must be a module-level def "
                f"so the worker process can import it, got {qualname!r}"
            )
        if not self.description and self.func.__doc__:
            object.__setattr__(
                self, "description", inspect.cleandoc(self.func.__doc__).split("\n")[0]
            )
