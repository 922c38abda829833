"""Loading a config and its plugins, the rules that reject a reload, and the reload cycle.

Start, SIGHUP and the control socket's ``reload`` all come here: start loads with
:func:`load_all`; a reload goes through :class:`Reloader`, which coalesces requests, loads
with :func:`load_all_on_loop`, applies the rejection rules (:func:`rejection`) and hands a
valid result to the daemon's ``apply``. Every reload ends in one :class:`ReloadResult`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from taskd.config import Config, load_config
from taskd.config.load import read_document, validate_steps
from taskd.config.steps import Steps, finish_in_slices
from taskd.errors import ConfigError, ConfigIssue
from taskd.jobspec import JobSpec
from taskd.plugin.manager import PluginHost
from taskd.plugin.resolve import resolve, resolve_steps
from taskd.schedule.jobset import Diff

log = structlog.get_logger("taskd.daemon")

RELOAD_TIMEOUT = 60.0  # seconds a reload may spend reading the config and importing plugins


@dataclass(frozen=True, slots=True)
class Loaded:
    """A config with its plugins resolved: what a start or a reload works from."""

    config: Config
    host: PluginHost
    specs: Mapping[str, JobSpec]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """How one reload ended. ``errors`` is empty exactly when ``ok``."""

    ok: bool
    at: float  # when it started (epoch seconds)
    took: float = 0.0
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_all(path: Path, config: Config | None = None) -> Loaded:
    """Read the config, load plugins, resolve jobs. Raises ConfigError with every problem.

    ``config``: the file already read and validated (``taskd run`` reads it before its
    loop exists, to set up logging): not read a second time (about 65 ms and a process for
    the parse, plus the validation, per 10,000 jobs)."""
    if config is None:
        config = load_config(path)
    host = _load_plugins(config)
    return _loaded(config, host, *resolve(config, host))


async def load_all_on_loop(path: Path, *, timeout: float) -> Loaded:
    """:func:`load_all` for a reload, while jobs run: what waits (the parse in its process,
    plugin imports) waits in a thread, bounded by ``timeout`` in all; what is CPU work (the
    config's validation, each job's options against its job type) runs on the loop in
    slices of about 5 ms (taskd.config.steps), so that no run due meanwhile starts late by
    more than a slice. Raises ConfigError, or TimeoutError past ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def left() -> float:
        return max(deadline - loop.time(), 0.0)

    document = await _in_thread(read_document, path, timeout=left())
    config = await finish_in_slices(validate_steps(*document))
    del document  # the TOML document: as large as the config, and of no further use
    host = await _in_thread(_load_plugins, config, timeout=left())
    return _loaded(config, host, *await finish_in_slices(resolve_steps(config, host)))


def _load_plugins(config: Config) -> PluginHost:
    d = config.daemon
    return PluginHost.load(d.plugin_dirs, entry_points=d.entry_points, disabled=d.disabled_plugins)


def _loaded(
    config: Config, host: PluginHost, specs: Mapping[str, JobSpec], issues: list[ConfigIssue]
) -> Loaded:
    for problem in host.folder_problems:
        log.warning("plugin_folder_problem", path=str(problem.path), problem=problem.message)
    if issues:
        raise ConfigError(issues)
    # The key -> line map only serves error messages, which are written by now; the daemon
    # keeps the config for its lifetime, so drop it (a few hundred bytes per job).
    return Loaded(dataclasses.replace(config, lines={}), host, specs)


def rejection(new: Loaded, old: Loaded) -> tuple[list[str], list[str]]:
    """The rules for broken plugins on reload: (errors that reject it, warnings).

    A reload that would leave a job broken that is not broken now (a new job whose plugin
    fails to load, an edit with a typo in a plugin that jobs use) is rejected, so the working
    version keeps running; at start such jobs are tolerated (the rest must run), on reload the
    operator can still fix the file. A job broken since before stays tolerated. A newly
    broken plugin file that no job needs (a half-written new plugin) is a warning."""
    newly = sorted(
        name
        for name, spec in new.specs.items()
        if spec.broken and spec.config.enabled and not _was_broken(old, name)
    )
    if newly:
        return [f"jobs.{name} would be broken: {new.specs[name].broken}" for name in newly], []
    before = {r.origin for r in old.host.broken}
    return [], [
        f"plugin failed to load, and no job uses it: {r.origin}: {r.error}"
        for r in new.host.broken
        if r.origin not in before
    ]


def _was_broken(old: Loaded, name: str) -> bool:
    spec = old.specs.get(name)
    return spec is not None and spec.broken is not None and spec.config.enabled


class Reloader:
    """Runs reloads one at a time. A storm of requests coalesces: one reload runs, at most
    one more waits, and every request is answered by the first reload that started after it
    (so a `taskd reload` right after editing the file never gets an older reload's answer).

    ``apply`` makes the daemon match a valid result and returns what changed."""

    def __init__(
        self,
        path: Path,
        loaded: Loaded,
        apply: Callable[[Loaded], Diff],
        *,
        before: Callable[[], None] = lambda: None,
        after: Callable[[ReloadResult], None] = lambda r: None,
        prepare: Callable[[Loaded], Steps[None]] | None = None,
    ) -> None:
        self.path = path
        self.loaded = loaded
        self._apply = apply
        self._before = before
        self._after = after
        self._prepare = prepare
        self.last: ReloadResult | None = None
        self._waiting: list[asyncio.Future[ReloadResult]] = []  # asked, not yet begun
        self._serving: list[asyncio.Future[ReloadResult]] = []  # the reload going now answers
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    def request(self) -> asyncio.Future[ReloadResult]:
        """Reload soon; the future gets the result of the reload that serves this request."""
        fut: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_result(ReloadResult(False, time.time(), errors=("the daemon is stopping",)))
            return fut
        self._waiting.append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="taskd-reload")
        return fut

    def close(self) -> None:
        """No more reloads (the daemon is stopping): cancel one in progress; whoever waits
        gets a failed result saying why."""
        self.closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        waiting, self._waiting, self._serving = [*self._serving, *self._waiting], [], []
        stopped = ReloadResult(False, time.time(), errors=("the daemon is stopping",))
        for fut in waiting:
            if not fut.done():
                fut.set_result(stopped)

    async def _loop(self) -> None:
        while self._waiting and not self.closed:
            self._serving, self._waiting = self._waiting, []
            result = await self.reload()
            waiting, self._serving = self._serving, []
            for fut in waiting:
                if not fut.done():
                    fut.set_result(result)

    async def reload(self) -> ReloadResult:
        """Validate everything first; apply only a fully valid config."""
        self._before()
        started = time.time()
        result = await self._load_and_apply(started)
        self.last = result
        if result.ok:
            log.info(
                "reloaded",
                added=list(result.added),
                changed=list(result.changed),
                removed=list(result.removed),
                took=result.took,
            )
        self._after(result)
        return result

    async def _load_and_apply(self, started: float) -> ReloadResult:
        def failed(errors: list[str], hint: str) -> ReloadResult:
            log.error("reload_failed", errors=errors, hint=hint)
            return ReloadResult(
                False, started, round(time.time() - started, 3), errors=tuple(errors)
            )

        try:
            # Plugin imports and file reads in a thread, the validation on the loop in short
            # slices: neither may stall the loop (its runs, its watchdog pings). Nothing live
            # is touched until this has fully succeeded.
            new = await load_all_on_loop(self.path, timeout=RELOAD_TIMEOUT)
        except TimeoutError:
            return failed(
                [f"loading config and plugins took longer than {RELOAD_TIMEOUT:g}s"],
                "a plugin's import may hang; the previous config keeps running",
            )
        except ConfigError as exc:
            return failed(
                [str(i) for i in exc.issues],
                "the previous config keeps running; fix the file and reload again",
            )
        except Exception as exc:
            log.exception(
                "reload_failed", error=repr(exc), hint="the previous config keeps running"
            )
            return ReloadResult(False, started, errors=(repr(exc),))
        errors, warnings = rejection(new, self.loaded)
        if errors:
            return failed(
                errors, "the previous config keeps running; fix the plugin and reload again"
            )
        for text in warnings:
            log.warning("reload_warning", warning=text)
        try:
            if self._prepare is not None:
                # Read-only work ahead of apply, in slices (JobSet.compare); apply itself
                # stays one piece, right after it with no await between.
                await finish_in_slices(self._prepare(new))
            diff = self._apply(new)
        except Exception as exc:  # a bug while applying must not end reloads for good
            log.exception("reload_apply_failed", error=repr(exc))
            return ReloadResult(
                False, started, errors=(f"applying the new config failed: {exc!r}",)
            )
        self.loaded = new
        return ReloadResult(
            True,
            started,
            round(time.time() - started, 3),
            diff.added,
            diff.changed,
            diff.removed,
            warnings=tuple(warnings),
        )


T = TypeVar("T")


async def _in_thread(func: Callable[..., T], /, *args: Any, timeout: float) -> T:
    """Run ``func`` in a daemon thread of its own and await it for at most ``timeout``.

    Not asyncio.to_thread: a call that never returns (a plugin import that hangs) would sit
    in the default executor, which asyncio waits for, without limit, when the loop closes."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def deliver(result: T | None, exc: BaseException | None) -> None:
        # The loop may be gone by now (a reload cancelled by the stop, then the exit):
        # nobody waits for the answer then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, exc)

    def target() -> None:
        try:
            result = func(*args)
        except BaseException as exc:  # delivered to the awaiting task, not lost in the thread
            deliver(None, exc)
        else:
            deliver(result, None)

    threading.Thread(target=target, name="taskd-load", daemon=True).start()
    return await asyncio.wait_for(fut, timeout)
