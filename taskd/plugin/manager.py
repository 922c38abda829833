"""PluginHost: a typed facade over pluggy. The rest of taskd never calls ``pm.hook`` itself.

Loading never stops at a bad plugin: each entry point and each drop-in file is loaded on its
own, and one that fails to import, register or answer ``taskd_job_types`` is recorded as
broken with its origin and traceback. Hooks are called one implementation at a time, so one
raising implementation is logged and the others' results are kept."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import traceback
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pluggy
import structlog

from taskd.plugin import dropin, hookspecs
from taskd.plugin.jobtype import JobType
from taskd.plugin.options import signature_problem
from taskd.run.executor.registry import ExecutorRegistry, builtin_registry

log = structlog.get_logger("taskd.plugins")

Origin = Literal["entry point", "file", "builtin"]
ENTRY_POINT_GROUP = "taskd"
HOOK_TIMEOUT = 60.0  # seconds an async hook implementation may take
_LOADING_HOOKS = frozenset({"taskd_job_types", "taskd_executors"})  # called while loading


def _hook_failed(hook: str, plugin: str, exc: BaseException) -> None:
    log.error(
        "hook_failed", hook=hook, plugin=plugin, error=f"{type(exc).__name__}: {exc}", exc_info=exc
    )


@dataclass(slots=True)
class PluginRecord:
    """One plugin as ``taskd plugins`` shows it."""

    name: str
    source: Origin
    origin: str  # file path, or "entry point <name> = <value> (<dist> <version>)"
    job_types: list[str] = field(default_factory=list)
    error: str | None = None  # one line: why it is broken
    traceback: str | None = None
    module_name: str | None = None
    plugin: object | None = None
    registered: bool = False

    @property
    def broken(self) -> bool:
        return self.error is not None


@dataclass(frozen=True, slots=True)
class FolderProblem:
    path: Path
    message: str


class PluginHost:
    """The loaded plugins, their job types, and one typed method per hook."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self.job_types: dict[str, JobType] = {}
        # The built-in executors and what plugins add (taskd_executors).
        self.executors: ExecutorRegistry = builtin_registry()
        # Job type name -> why it cannot be used (clash between plugins).
        self.conflicts: dict[str, str] = {}
        self.folder_problems: list[FolderProblem] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        plugin_dirs: Iterable[Path] = (),
        *,
        entry_points: bool = True,
        disabled: Sequence[str] = (),
        extra: Sequence[object] = (),
        files: Sequence[dropin.DropinFile] = (),
    ) -> PluginHost:
        """Load installed plugins, then drop-in files in folder order, then single ``files``
        and ``extra`` objects (used by taskd.testing, tests and embedders)."""
        host = cls()
        if entry_points:
            host._load_entry_points(disabled)
        found, problems = dropin.scan(tuple(plugin_dirs))
        files = [*found, *files]
        host.folder_problems = [FolderProblem(p, m) for p, m in problems]
        for file in files:
            if file.path.stem in disabled:
                continue
            host._load_file(file)
        for obj in extra:
            name = getattr(obj, "__name__", type(obj).__name__)
            host._register(PluginRecord(name=name, source="builtin", origin=repr(obj)), obj)
        host._collect_job_types()
        host._collect_executors()
        return host

    def _load_entry_points(self, disabled: Sequence[str]) -> None:
        try:
            eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken installed distribution must not stop the daemon
            log.error("entry_points_unreadable", error=repr(exc))
            return
        for ep in sorted(eps, key=lambda e: e.name):
            if ep.name in disabled:
                continue
            dist = getattr(ep, "dist", None)
            where = f" ({dist.name} {dist.version})" if dist is not None else ""
            record = PluginRecord(
                name=ep.name,
                source="entry point",
                origin=f"entry point {ep.name} = {ep.value}{where}",
            )
            try:
                obj = ep.load()
            except BaseException as exc:
                self._broken(record, f"import failed: {type(exc).__name__}: {exc}", exc)
                continue
            self._register(record, obj)

    def _load_file(self, file: dropin.DropinFile) -> None:
        record = PluginRecord(
            name=file.path.stem, source="file", origin=str(file.path), module_name=file.module_name
        )
        if file.refused is not None:  # not safe to run (taskd.trust): never imported
            self._broken(record, f"refused: {file.refused}", PermissionError(file.refused))
            return
        try:
            module: ModuleType = dropin.load(file)
        except BaseException as exc:  # SyntaxError, SystemExit at import: still just this plugin
            self._broken(record, f"import failed: {type(exc).__name__}: {exc}", exc)
            return
        self._register(record, module)

    def _register(self, record: PluginRecord, obj: object) -> None:
        record.plugin = obj
        self.records.append(record)
        if self.pm.is_registered(obj):
            # The same module behind two entry points: the first record owns it.
            self._broken(record, "already loaded under another name", ValueError(record.origin))
            return
        try:
            self.pm.register(obj, name=f"{record.source}:{record.origin}")
            record.registered = True
            # pluggy accepts an implementation of an unknown hook (a typo such as
            # taskd_job_type) until asked; earlier plugins passed, so a failure is this one's.
            self.pm.check_pending()
            self._check_hook_forms(obj)
        except Exception as exc:  # PluginValidationError, or a name registered twice
            self._broken(record, f"not a valid taskd plugin: {exc}", exc)

    def _check_hook_forms(self, plugin: object) -> None:
        """Forms pluggy accepts but taskd's one-implementation-at-a-time calls cannot honour."""
        for name in (
            "taskd_job_types",
            "taskd_executors",
            "taskd_daemon_started",
            "taskd_daemon_stopping",
            "taskd_job_event",
            "taskd_config_reloaded",
        ):
            for impl in getattr(self.pm.hook, name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if impl.hookwrapper or getattr(impl, "wrapper", False):
                    raise TypeError(
                        f"{name}: hook wrappers are not supported by taskd; write a plain hook"
                    )
                if name in _LOADING_HOOKS and inspect.iscoroutinefunction(impl.function):
                    raise TypeError(
                        f"{name} must be a plain def (it is called while loading), not async def"
                    )

    def _broken(self, record: PluginRecord, message: str, exc: BaseException) -> None:
        record.error = message
        record.traceback = "".join(traceback.format_exception(exc))
        if record not in self.records:
            self.records.append(record)
        if record.registered and record.plugin is not None and self.pm.is_registered(record.plugin):
            with contextlib.suppress(Exception):
                self.pm.unregister(record.plugin)
        log.error(
            "plugin_broken",
            plugin=record.name,
            origin=record.origin,
            error=message,
            traceback=record.traceback,
        )

    def _collect_job_types(self) -> None:
        """Ask each plugin for its job types, one plugin at a time."""
        owners: dict[str, PluginRecord] = {}
        for record in self.records:
            if record.broken or record.plugin is None:
                continue
            impls = [
                i for i in self.pm.hook.taskd_job_types.get_hookimpls() if i.plugin is record.plugin
            ]
            types: list[JobType] = []
            try:
                for impl in impls:
                    types.extend(self._check_job_types(impl.function(), record))
            except BaseException as exc:  # SystemExit too: only this plugin is broken
                self._broken(record, f"taskd_job_types() failed: {type(exc).__name__}: {exc}", exc)
                continue
            for jt in types:
                if jt.name in owners or jt.name in self.conflicts:
                    first = owners.pop(jt.name, None)
                    self.job_types.pop(jt.name, None)
                    if first is not None:
                        first.job_types.remove(jt.name)
                        self.conflicts[jt.name] = (
                            f"job type {jt.name!r} is provided by both {first.origin} and {record.origin}; "
                            f"remove one, or block one with daemon.disabled_plugins"
                        )
                    log.error("job_type_conflict", job_type=jt.name, error=self.conflicts[jt.name])
                    continue
                owners[jt.name] = record
                self.job_types[jt.name] = jt
                record.job_types.append(jt.name)

    def _collect_executors(self) -> None:
        """Ask each plugin for its executors, one plugin at a time: one that raises (a name
        taken already, say) is broken, and what it registered before is kept out."""
        for record in self.records:
            if record.broken or record.plugin is None:
                continue
            impls = [
                i for i in self.pm.hook.taskd_executors.get_hookimpls() if i.plugin is record.plugin
            ]
            if not impls:
                continue
            trial = self.executors.copy()
            try:
                for impl in impls:
                    impl.function(trial)
            except BaseException as exc:  # as in _collect_job_types
                self._broken(record, f"taskd_executors() failed: {type(exc).__name__}: {exc}", exc)
                continue
            self.executors = trial

    @staticmethod
    def _check_job_types(returned: Any, record: PluginRecord) -> list[JobType]:
        if returned is None:
            return []
        if isinstance(returned, JobType):
            returned = [returned]
        if not isinstance(returned, list | tuple):
            raise TypeError(
                f"taskd_job_types() must return a list of taskd.JobType, got {type(returned).__name__}"
            )
        out: list[JobType] = []
        for item in returned:
            if not isinstance(item, JobType):
                raise TypeError(f"taskd_job_types() returned {item!r}, not a taskd.JobType")
            problem = signature_problem(item)
            if problem:
                raise TypeError(f"job type {item.name!r}: {problem}")
            out.append(dataclasses.replace(item, origin=record.origin))
        return out

    # -- queries --------------------------------------------------------------------------

    @property
    def broken(self) -> list[PluginRecord]:
        return [r for r in self.records if r.broken]

    def why_missing(self, type_name: str) -> str | None:
        """Why a job type is not available, when a broken plugin or a clash may explain it."""
        if type_name in self.conflicts:
            return self.conflicts[type_name]
        broken = self.broken
        if broken:
            names = ", ".join(f"{r.origin} ({r.error})" for r in broken)
            return f"job type {type_name!r} not found; plugins that failed to load: {names}"
        return None

    def has_impls(self, hook: str) -> bool:
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    def plugin_of(self, files: Iterable[str]) -> str | None:
        """The plugin (its name as ``hook_failed`` gives it) that owns the first of ``files``
        to be a plugin's: a drop-in file, or the module or package of an installed plugin.
        Given a traceback's files outermost first, that is the plugin whose code ran it."""
        owners: list[tuple[str, str]] = []  # (file, or package folder + os.sep; name)
        for record in self.records:
            path = getattr(record.plugin, "__file__", None)
            if not isinstance(path, str):
                continue
            if os.path.basename(path) == "__init__.py":
                path = os.path.dirname(path) + os.sep
            name = self.pm.get_name(record.plugin) if record.registered else None
            owners.append((path, name or f"{record.source}:{record.origin}"))
        for file in files:
            for path, name in owners:
                if file == path or (path.endswith(os.sep) and file.startswith(path)):
                    return name
        return None

    # -- hook calls -------------------------------------------------------------------------

    def _call_each(self, hook: str, **kwargs: Any) -> list[Awaitable[Any]]:
        """Call every implementation on its own; log (not raise) what one raises. Returns the
        awaitables that async implementations gave back."""
        pending: list[Awaitable[Any]] = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                result = impl.function(*[kwargs[name] for name in impl.argnames])
            except BaseException as exc:  # SystemExit, CancelledError too: a plugin never stops us
                _hook_failed(hook, impl.plugin_name, exc)
                continue
            if inspect.isawaitable(result):
                pending.append(self._guard(hook, impl.plugin_name, result))
        return pending

    async def _guard(self, hook: str, plugin: str, awaitable: Awaitable[Any]) -> None:
        # The timeout: a notifier that hangs must not pile up one task per event for ever.
        deadline = asyncio.timeout(HOOK_TIMEOUT)
        try:
            # Awaited here, in the guard's own task, not in a task of its own as wait_for
            # would: asyncio re-raises SystemExit and KeyboardInterrupt out of the loop from
            # whichever task raised them, so only inside this frame can they be caught.
            async with deadline:
                await awaitable
        except TimeoutError as exc:
            if not deadline.expired():  # the plugin's own TimeoutError
                _hook_failed(hook, plugin, exc)
            else:
                log.error("hook_timeout", hook=hook, plugin=plugin, timeout=HOOK_TIMEOUT)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the daemon is cancelling us (a stopping hook past its time)
            _hook_failed(hook, plugin, exc)  # the plugin raised it itself
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, GeneratorExit too
            _hook_failed(hook, plugin, exc)

    def _spawn(self, awaitables: list[Awaitable[Any]]) -> None:
        for aw in awaitables:
            task = asyncio.ensure_future(aw)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _await_all(self, awaitables: list[Awaitable[Any]], timeout: float) -> None:
        if not awaitables:
            return
        tasks = [asyncio.ensure_future(a) for a in awaitables]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.error("hook_timeout", timeout=timeout)
            task.cancel()

    def job_event(self, event: Any) -> None:
        """Deliver a job event; async implementations run in tasks of their own so a slow
        notifier never delays a run."""
        self._spawn(self._call_each("taskd_job_event", event=event))

    async def daemon_started(self, info: dict[str, Any], timeout: float = 10.0) -> None:
        await self._await_all(self._call_each("taskd_daemon_started", info=info), timeout)

    async def daemon_stopping(self, info: dict[str, Any], timeout: float = 10.0) -> None:
        await self._await_all(self._call_each("taskd_daemon_stopping", info=info), timeout)

    def config_reloaded(
        self, added: Sequence[str], changed: Sequence[str], removed: Sequence[str]
    ) -> None:
        self._spawn(
            self._call_each("taskd_config_reloaded", added=added, changed=changed, removed=removed)
        )

    async def drain_hooks(self, timeout: float = 5.0) -> None:
        """Wait briefly for async hook calls still going (at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
