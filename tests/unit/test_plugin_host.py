"""PluginHost: drop-in files, entry points and extra objects loaded one by one; a broken plugin
is recorded with origin and traceback while the others work; hooks are called one at a time.
Also resolve(): config + plugins -> JobSpecs and issues."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import types
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import taskd
from taskd.config import load_config
from taskd.jobspec import JobSpec
from taskd.plugin import dropin
from taskd.plugin.manager import PluginHost, PluginRecord
from taskd.plugin.resolve import resolve
from taskd.run.events import EventKind, JobEvent
from taskd.schedule.triggers import Cron, Every

GOOD = """
import taskd

async def ping(ctx, url: str = "https://example.org", tries: int = 1) -> dict:
    \"\"\"Probe a URL.\"\"\"
    return {"url": url}

def crunch(n: int = 10) -> int:
    return n * 2

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("ping", ping), taskd.JobType("crunch", crunch, kind="cpu")]
"""

BROKEN: dict[str, tuple[str, str]] = {
    # name: (source, fragment of record.error)
    "syntax": ("import taskd\ndef oops(:\n    pass\n", "import failed: SyntaxError"),
    "raises": (
        "import taskd\nraise RuntimeError('no database driver')\n",
        "RuntimeError: no database driver",
    ),
    "missing_lib": ("import no_such_module_for_taskd_tests\n", "ModuleNotFoundError"),
    "exits": ("import sys\nsys.exit(3)\n", "import failed: SystemExit: 3"),
    "hook_raises": (
        "import taskd\n@taskd.hookimpl\ndef taskd_job_types():\n    raise ValueError('bad state')\n",
        "taskd_job_types() failed: ValueError: bad state",
    ),
    "returns_int": (
        "import taskd\n@taskd.hookimpl\ndef taskd_job_types():\n    return 42\n",
        "must return a list of taskd.JobType, got int",
    ),
    "returns_strings": (
        "import taskd\n@taskd.hookimpl\ndef taskd_job_types():\n    return ['ping2']\n",
        "returned 'ping2', not a taskd.JobType",
    ),
    "bad_jobtype": (
        "import taskd\ndef f():\n    pass\n"
        "@taskd.hookimpl\ndef taskd_job_types():\n    return [taskd.JobType('f', f)]\n",
        "kind='io' needs an 'async def' function",
    ),
    "positional_only": (
        "import taskd\ndef f(a, /):\n    pass\n"
        "@taskd.hookimpl\ndef taskd_job_types():\n    return [taskd.JobType('posonly', f, kind='blocking')]\n",
        "parameter 'a' is positional-only",
    ),
    "bad_argname": (
        "import taskd\n@taskd.hookimpl\ndef taskd_job_event(evnt):\n    pass\n",
        "not a valid taskd plugin",
    ),
    "unknown_hook": (
        "import taskd\n@taskd.hookimpl\ndef taskd_foo():\n    pass\n",
        "taskd_foo",
    ),
}


@pytest.fixture(autouse=True)
def _forget_dropins() -> Iterator[None]:
    """Drop-in modules and test modules imported by a test are removed afterwards."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith((dropin.PREFIX, "taskd_test_")):
            del sys.modules[name]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A module plugin files can ``import taskd_test_recorder`` and append calls to."""
    rec = types.SimpleNamespace(calls=[])
    monkeypatch.setitem(sys.modules, "taskd_test_recorder", rec)
    return rec


Plugins = Callable[..., Path]


@pytest.fixture
def plugins(tmp_path: Path) -> Plugins:
    """``plugins({"a.py": source}, folder="plugins.d")`` writes files, returns the folder."""

    def create(files: dict[str, str], folder: str = "plugins.d") -> Path:
        d = tmp_path / folder
        d.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            (d / name).write_text(textwrap.dedent(source))
        return d

    return create


def record(host: PluginHost, name: str) -> PluginRecord:
    found = [r for r in host.records if r.name == name]
    assert found, f"no plugin {name!r} in {[r.name for r in host.records]}"
    return found[0]


class TestDropinFiles:
    """A plugin file in a folder registers its job types with its path as origin."""

    def test_good_file(self, plugins: Plugins) -> None:
        folder = plugins({"net.py": GOOD})
        host = PluginHost.load([folder], entry_points=False)
        rec = record(host, "net")
        assert rec.source == "file"
        assert rec.origin == str(folder / "net.py")
        assert not rec.broken
        assert (rec.error, rec.traceback) == (None, None)
        assert rec.job_types == ["ping", "crunch"]
        assert set(host.job_types) == {"ping", "crunch"}
        ping = host.job_types["ping"]
        assert ping.origin == str(folder / "net.py")
        assert ping.kind == "io"
        assert ping.description == "Probe a URL."
        assert host.job_types["crunch"].kind == "cpu"
        assert rec.module_name is not None
        assert rec.module_name.startswith(f"{dropin.PREFIX}net_")
        assert sys.modules[rec.module_name].ping is ping.func
        assert host.broken == []
        assert host.folder_problems == []

    def test_single_jobtype_and_none_are_accepted(self, plugins: Plugins) -> None:
        folder = plugins(
            {
                "one.py": """
                import taskd
                def f() -> None: ...
                @taskd.hookimpl
                def taskd_job_types():
                    return taskd.JobType("single", f, kind="blocking")
                """,
                "none.py": """
                import taskd
                @taskd.hookimpl
                def taskd_job_types():
                    return None
                """,
            }
        )
        host = PluginHost.load([folder], entry_points=False)
        assert set(host.job_types) == {"single"}
        assert record(host, "none").job_types == []
        assert host.broken == []

    def test_file_without_hooks_is_a_plugin_with_no_types(self, plugins: Plugins) -> None:
        host = PluginHost.load([plugins({"helpers.py": "X = 1\n"})], entry_points=False)
        rec = record(host, "helpers")
        assert not rec.broken
        assert rec.job_types == []

    def test_underscore_and_dot_files_and_other_suffixes_are_skipped(
        self, plugins: Plugins
    ) -> None:
        folder = plugins(
            {
                "_helpers.py": "raise RuntimeError('must not be imported')\n",
                ".hidden.py": "raise RuntimeError('must not be imported')\n",
                "notes.txt": "not python",
                "old.py.bak": "raise RuntimeError('must not be imported')\n",
                "net.py": GOOD,
            }
        )
        (folder / "sub").mkdir()
        (folder / "sub" / "deep.py").write_text("raise RuntimeError('not recursive')\n")
        host = PluginHost.load([folder], entry_points=False)
        assert [r.name for r in host.records] == ["net"]
        assert host.broken == []

    def test_folder_order_then_name(self, plugins: Plugins) -> None:
        first = plugins({"zeta.py": "", "alpha.py": ""}, folder="first")
        second = plugins({"beta.py": ""}, folder="second")
        host = PluginHost.load([second, first], entry_points=False)
        assert [r.name for r in host.records] == ["beta", "alpha", "zeta"]

    def test_missing_folder_is_a_problem_not_a_crash(
        self, plugins: Plugins, tmp_path: Path
    ) -> None:
        good = plugins({"net.py": GOOD})
        missing = tmp_path / "nope.d"
        a_file = tmp_path / "file.d"
        a_file.write_text("")
        host = PluginHost.load([missing, good, a_file], entry_points=False)
        assert [(p.path, p.message) for p in host.folder_problems] == [
            (missing, "plugin folder does not exist"),
            (a_file, "plugin_dirs entry is not a folder"),
        ]
        assert "ping" in host.job_types

    def test_disabled_file_is_not_loaded(self, plugins: Plugins) -> None:
        folder = plugins({"net.py": GOOD, "noisy.py": "raise RuntimeError('boom')\n"})
        host = PluginHost.load([folder], entry_points=False, disabled=["noisy"])
        assert [r.name for r in host.records] == ["net"]

    def test_extra_objects_are_builtin_plugins(self) -> None:
        async def job(ctx: Any) -> None: ...

        class Builtin:
            @taskd.hookimpl
            def taskd_job_types(self) -> list[taskd.JobType]:
                return [taskd.JobType("builtin_job", job)]

        obj = Builtin()
        host = PluginHost.load([], entry_points=False, extra=[obj])
        rec = record(host, "Builtin")
        assert rec.source == "builtin"
        assert rec.origin == repr(obj)
        assert host.job_types["builtin_job"].origin == repr(obj)


class TestBrokenPlugins:
    """A plugin that fails is a broken record with origin and traceback; the rest still work."""

    @pytest.mark.parametrize("name", sorted(BROKEN))
    def test_broken_next_to_good(self, plugins: Plugins, name: str) -> None:
        source, fragment = BROKEN[name]
        folder = plugins({f"{name}.py": source, "zz_good.py": GOOD})
        with capture_logs() as logs:
            host = PluginHost.load([folder], entry_points=False)
        rec = record(host, name)
        assert rec.broken
        assert rec.error is not None
        assert fragment in rec.error
        assert rec.origin == str(folder / f"{name}.py")
        assert rec.traceback is not None
        assert rec.traceback.startswith("Traceback")
        assert rec.job_types == []
        assert {r.name for r in host.broken} == {name}
        # the good plugin in the same folder is unaffected
        assert not record(host, "zz_good").broken
        assert set(host.job_types) == {"ping", "crunch"}
        logged = [e for e in logs if e["event"] == "plugin_broken"]
        assert [e["origin"] for e in logged] == [rec.origin]
        assert logged[0]["traceback"] == rec.traceback

    @pytest.mark.parametrize("name", sorted(BROKEN))
    def test_broken_is_listed_once(self, plugins: Plugins, name: str) -> None:
        folder = plugins({f"{name}.py": BROKEN[name][0]})
        host = PluginHost.load([folder], entry_points=False)
        assert [r.name for r in host.records] == [name]
        assert len(host.broken) == 1

    @pytest.mark.parametrize("name", ["syntax", "raises", "exits", "missing_lib"])
    def test_traceback_points_into_the_file(self, plugins: Plugins, name: str) -> None:
        folder = plugins({f"{name}.py": BROKEN[name][0]})
        rec = record(PluginHost.load([folder], entry_points=False), name)
        assert rec.traceback is not None
        assert str(folder / f"{name}.py") in rec.traceback

    @pytest.mark.parametrize("name", ["syntax", "raises", "exits", "missing_lib"])
    def test_failed_import_leaves_no_module(self, plugins: Plugins, name: str) -> None:
        folder = plugins({f"{name}.py": BROKEN[name][0]})
        rec = record(PluginHost.load([folder], entry_points=False), name)
        assert rec.module_name is not None
        assert rec.module_name not in sys.modules

    def test_hook_failure_traceback_names_the_plugin_line(self, plugins: Plugins) -> None:
        folder = plugins({"hook_raises.py": BROKEN["hook_raises"][0]})
        rec = record(PluginHost.load([folder], entry_points=False), "hook_raises")
        assert rec.traceback is not None
        assert f'File "{folder / "hook_raises.py"}", line 4' in rec.traceback
        assert "ValueError: bad state" in rec.traceback

    def test_broken_plugin_hooks_are_not_called(
        self, plugins: Plugins, recorder: types.SimpleNamespace
    ) -> None:
        folder = plugins(
            {
                "half.py": """
                import taskd
                import taskd_test_recorder as rec

                @taskd.hookimpl
                def taskd_job_types():
                    raise RuntimeError("cannot list types")

                @taskd.hookimpl
                def taskd_job_event(event):
                    rec.calls.append(("half", event.job))
                """,
                "ok.py": """
                import taskd
                import taskd_test_recorder as rec

                @taskd.hookimpl
                def taskd_job_event(event):
                    rec.calls.append(("ok", event.job))
                """,
            }
        )
        host = PluginHost.load([folder], entry_points=False)
        assert record(host, "half").broken
        host.job_event(_event("j1"))
        assert recorder.calls == [("ok", "j1")]

    def test_one_broken_type_makes_the_whole_plugin_broken(self, plugins: Plugins) -> None:
        folder = plugins(
            {
                "mixed.py": """
                import taskd
                def fine() -> None: ...
                def bad(a, /) -> None: ...
                @taskd.hookimpl
                def taskd_job_types():
                    return [taskd.JobType("fine", fine, kind="blocking"),
                            taskd.JobType("bad", bad, kind="blocking")]
                """
            }
        )
        host = PluginHost.load([folder], entry_points=False)
        assert record(host, "mixed").broken
        assert host.job_types == {}


class TestConflicts:
    """Two plugins offering the same job type name: neither wins, both are named."""

    SOURCE = """
    import taskd
    def work(n: int = 1) -> int:
        return n
    def {own}() -> None: ...
    @taskd.hookimpl
    def taskd_job_types():
        return [taskd.JobType("work", work, kind="blocking"),
                taskd.JobType("{own}", {own}, kind="blocking")]
    """

    def _host(self, plugins: Plugins, *names: str) -> tuple[PluginHost, Path]:
        folder = plugins({f"{n}.py": self.SOURCE.format(own=f"{n}_only") for n in names})
        with capture_logs():
            return PluginHost.load([folder], entry_points=False), folder

    def test_conflict(self, plugins: Plugins) -> None:
        host, folder = self._host(plugins, "a", "b")
        assert "work" not in host.job_types
        assert set(host.job_types) == {"a_only", "b_only"}
        why = host.conflicts["work"]
        assert str(folder / "a.py") in why
        assert str(folder / "b.py") in why
        assert "disabled_plugins" in why
        assert host.why_missing("work") == why
        assert host.broken == []

    def test_three_providers(self, plugins: Plugins) -> None:
        host, _ = self._host(plugins, "a", "b", "c")
        assert "work" not in host.job_types
        assert set(host.conflicts) == {"work"}
        assert set(host.job_types) == {"a_only", "b_only", "c_only"}

    def test_conflicting_type_is_listed_by_no_plugin(self, plugins: Plugins) -> None:
        host, _ = self._host(plugins, "a", "b")
        for rec in host.records:
            assert all(name in host.job_types for name in rec.job_types), rec

    def test_disabling_one_resolves_it(self, plugins: Plugins) -> None:
        folder = plugins({f"{n}.py": self.SOURCE.format(own=f"{n}_only") for n in "ab"})
        host = PluginHost.load([folder], entry_points=False, disabled=["b"])
        assert host.conflicts == {}
        assert host.job_types["work"].origin == str(folder / "a.py")

    def test_resolve_marks_jobs_broken(self, plugins: Plugins, tmp_path: Path) -> None:
        host, _ = self._host(plugins, "a", "b")
        cfg = _config(tmp_path, '[jobs.w]\ntype = "work"\nevery = "1m"\n')
        specs, issues = resolve(cfg, host)
        assert issues == []
        assert specs["w"].broken == host.conflicts["work"]
        assert specs["w"].jobtype is None
        assert specs["w"].trigger == Every(60.0)


class TestModuleNames:
    """A drop-in's module name is stable for an unchanged file and changes with its content."""

    def test_stable_and_reused(self, plugins: Plugins) -> None:
        folder = plugins({"net.py": GOOD})
        first = PluginHost.load([folder], entry_points=False)
        second = PluginHost.load([folder], entry_points=False)
        assert record(first, "net").module_name == record(second, "net").module_name
        assert first.job_types["ping"].func is second.job_types["ping"].func

    def test_changed_file_gets_a_new_module(self, plugins: Plugins) -> None:
        folder = plugins({"net.py": GOOD})
        first = PluginHost.load([folder], entry_points=False)
        old_name = record(first, "net").module_name
        plugins({"net.py": GOOD.replace("n * 2", "n * 3")})
        second = PluginHost.load([folder], entry_points=False)
        new_name = record(second, "net").module_name
        assert new_name != old_name
        assert second.job_types["crunch"].func(5) == 15
        # the old module, maybe used by runs in flight, is left alone
        assert first.job_types["crunch"].func(5) == 10
        assert old_name in sys.modules

    def test_same_content_other_path_differs(self, plugins: Plugins) -> None:
        a = plugins({"net.py": GOOD}, folder="a")
        b = plugins({"net.py": GOOD}, folder="b")
        files, _ = dropin.scan((a, b))
        assert len({f.module_name for f in files}) == 2

    def test_scan_names(self, plugins: Plugins) -> None:
        folder = plugins({"my-plugin.v2.py": ""})
        (file,), problems = dropin.scan((folder,))
        assert problems == []
        assert file.module_name.startswith(f"{dropin.PREFIX}my_plugin_v2_")
        assert file.module_name.isidentifier()
        assert dropin.scan((folder,))[0][0].module_name == file.module_name

    def test_fixed_broken_file_loads_on_the_next_load(self, plugins: Plugins) -> None:
        folder = plugins({"net.py": "raise RuntimeError('not yet')\n"})
        assert record(PluginHost.load([folder], entry_points=False), "net").broken
        plugins({"net.py": GOOD})
        host = PluginHost.load([folder], entry_points=False)
        assert not record(host, "net").broken
        assert "ping" in host.job_types


class TestPluginFileLimits:
    """Only regular files of at most MAX_PLUGIN_BYTES are read; anything else in a plugin
    folder is a folder problem naming the path, and the rest of the folder loads."""

    @pytest.fixture
    def odd_folder(self, plugins: Plugins) -> Path:
        """net.py (good), a FIFO x.py, z.py -> /dev/zero and a 2 MiB big.py."""
        folder = plugins({"net.py": GOOD})
        os.mkfifo(folder / "x.py")
        (folder / "z.py").symlink_to("/dev/zero")
        (folder / "big.py").write_text("X = 1\n" + "#" * 99 + "\n" * (2 * 1024 * 1024))
        return folder

    @pytest.mark.timeout(10)
    def test_odd_files_are_problems_and_the_rest_loads(self, odd_folder: Path) -> None:
        host = PluginHost.load([odd_folder], entry_points=False)
        assert [r.name for r in host.records] == ["net"]
        assert "ping" in host.job_types
        problems = {p.path.name: p.message for p in host.folder_problems}
        assert set(problems) == {"x.py", "z.py", "big.py"}
        assert "not a regular file but a FIFO" in problems["x.py"]
        assert "a character device (a symlink to /dev/zero)" in problems["z.py"]
        assert f"over the limit of {dropin.MAX_PLUGIN_BYTES} bytes" in problems["big.py"]

    @pytest.mark.timeout(10)
    def test_a_folder_named_py_is_a_problem(self, plugins: Plugins) -> None:
        folder = plugins({"net.py": GOOD})
        (folder / "pkg.py").mkdir()
        files, problems = dropin.scan((folder,))
        assert [f.path.name for f in files] == ["net.py"]
        assert [(p.name, "a folder" in m) for p, m in problems] == [("pkg.py", True)]

    def test_symlink_to_a_regular_file_is_followed(self, plugins: Plugins, tmp_path: Path) -> None:
        elsewhere = tmp_path / "shared" / "net.py"
        elsewhere.parent.mkdir()
        elsewhere.write_text(textwrap.dedent(GOOD))
        folder = plugins({})
        (folder / "net.py").symlink_to(elsewhere)
        host = PluginHost.load([folder], entry_points=False)
        assert host.folder_problems == []
        assert "ping" in host.job_types

    def test_limit_is_inclusive(self, plugins: Plugins, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(dropin, "MAX_PLUGIN_BYTES", 1000)
        folder = plugins({"at.py": "#" * 999 + "\n", "over.py": "#" * 1000 + "\n"})
        files, problems = dropin.scan((folder,))
        assert [f.path.name for f in files] == ["at.py"]
        assert len(files[0].source) == 1000
        assert [p.name for p, _ in problems] == ["over.py"]

    @pytest.mark.timeout(10)
    def test_fifo_swapped_in_after_stat_does_not_hang(
        self, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = plugins({"net.py": GOOD, "regular.py": ""})
        fifo = folder / "x.py"
        os.mkfifo(fifo)
        real_stat = os.stat

        def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            # What stat saw before the swap: a regular file.
            if str(path) == str(fifo):
                return real_stat(folder / "regular.py")
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "stat", stat)
        files, problems = dropin.scan((folder,))
        assert [f.path.name for f in files] == ["net.py", "regular.py"]
        assert [(p.name, "a FIFO" in m) for p, m in problems] == [("x.py", True)]

    @pytest.mark.timeout(10)
    def test_file_growing_after_stat_is_read_no_further_than_the_limit(
        self, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = plugins({"small.py": ""})
        grows = folder / "grows.py"
        grows.write_text("X = 1\n" * (1024 * 1024))
        small, big = os.stat(folder / "small.py"), os.stat(grows)
        # grows.py as it was when checked: the same file (device and inode), still small
        was = os.stat_result((small.st_mode, big.st_ino, big.st_dev, *small[3:10]))
        real_lstat, real_fstat, real_read = os.lstat, os.fstat, os.read
        read: list[int] = []

        def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            return was if str(path) == str(grows) else real_lstat(path, *args, **kwargs)

        def fstat(fd: int) -> os.stat_result:  # as if it was still small when checked
            found = real_fstat(fd)
            return was if found.st_ino == big.st_ino else found

        def counting_read(fd: int, n: int) -> bytes:
            data = real_read(fd, n)
            read.append(len(data))
            return data

        monkeypatch.setattr(os, "lstat", lstat)
        monkeypatch.setattr(os, "fstat", fstat)
        monkeypatch.setattr(os, "read", counting_read)
        files, problems = dropin.scan((folder,))
        assert [f.path.name for f in files] == ["small.py"]
        assert [(p.name, "still growing" in m) for p, m in problems] == [("grows.py", True)]
        assert sum(read) == dropin.MAX_PLUGIN_BYTES + 1

    @pytest.mark.timeout(10)
    def test_worker_side_read_refuses_a_fifo(self, plugins: Plugins) -> None:
        """A process-pool worker reads the file again: it must not hang there either."""
        fifo = plugins({}) / "x.py"
        os.mkfifo(fifo)
        with pytest.raises(ImportError, match="not a regular file but a FIFO"):
            dropin.exec_file(f"{dropin.PREFIX}x_0123456789", str(fifo))


def _event(job: str = "j", kind: EventKind = EventKind.FAILED) -> JobEvent:
    return JobEvent(kind, job, "run1", datetime(2026, 1, 1, tzinfo=UTC), 1, 0.0)


class _Rec:
    """A plugin object recording the hook calls it gets."""

    def __init__(self, calls: list[tuple[str, Any]], label: str) -> None:
        self.calls = calls
        self.label = label

    def __repr__(self) -> str:
        return f"<{self.label}>"


class SyncEvents(_Rec):
    @taskd.hookimpl
    def taskd_job_event(self, event: JobEvent) -> None:
        self.calls.append((self.label, event.job))


class RaisingEvents(_Rec):
    @taskd.hookimpl
    def taskd_job_event(self, event: JobEvent) -> None:
        self.calls.append((self.label, event.job))
        raise RuntimeError("notifier down")


class ExitingEvents(_Rec):
    @taskd.hookimpl
    def taskd_job_event(self, event: JobEvent) -> None:
        self.calls.append((self.label, event.job))
        sys.exit("notifier gave up")


class AsyncEvents(_Rec):
    @taskd.hookimpl
    async def taskd_job_event(self, event: JobEvent) -> None:
        await asyncio.sleep(0.01)
        self.calls.append((self.label, event.job))


class AsyncRaisingEvents(_Rec):
    @taskd.hookimpl
    async def taskd_job_event(self, event: JobEvent) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async notifier down")


class Lifecycle(_Rec):
    @taskd.hookimpl
    async def taskd_daemon_started(self, info: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)
        self.calls.append((self.label, "started", info["pid"]))

    @taskd.hookimpl
    def taskd_daemon_stopping(self, info: dict[str, Any]) -> None:
        self.calls.append((self.label, "stopping", info["pid"]))

    @taskd.hookimpl
    def taskd_config_reloaded(
        self, added: list[str], changed: list[str], removed: list[str]
    ) -> None:
        self.calls.append((self.label, "reloaded", (added, changed, removed)))


class SlowStart(_Rec):
    @taskd.hookimpl
    async def taskd_daemon_started(self, info: dict[str, Any]) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.calls.append((self.label, "cancelled"))
            raise


class TestHooks:
    """Each implementation is called on its own: one that raises never stops the others."""

    def test_middle_raising_impl(self) -> None:
        calls: list[Any] = []
        impls = [SyncEvents(calls, "one"), RaisingEvents(calls, "two"), SyncEvents(calls, "three")]
        host = PluginHost.load([], entry_points=False, extra=impls)
        with capture_logs() as logs:
            host.job_event(_event("backup"))
        assert sorted(calls) == [("one", "backup"), ("three", "backup"), ("two", "backup")]
        failed = [e for e in logs if e["event"] == "hook_failed"]
        assert len(failed) == 1
        assert failed[0]["hook"] == "taskd_job_event"
        assert "<two>" in failed[0]["plugin"]
        assert failed[0]["error"] == "RuntimeError: notifier down"

    def test_every_event_reaches_every_impl(self) -> None:
        calls: list[Any] = []
        host = PluginHost.load(
            [], entry_points=False, extra=[SyncEvents(calls, "a"), RaisingEvents(calls, "b")]
        )
        with capture_logs():
            for job in ("j1", "j2", "j3"):
                host.job_event(_event(job))
        assert sorted(c for c in calls if c[0] == "a") == [("a", "j1"), ("a", "j2"), ("a", "j3")]

    def test_system_exit_in_a_hook_is_contained(self) -> None:
        calls: list[Any] = []
        impls = [SyncEvents(calls, "one"), ExitingEvents(calls, "two"), SyncEvents(calls, "three")]
        host = PluginHost.load([], entry_points=False, extra=impls)
        with capture_logs():
            host.job_event(_event("backup"))  # must not raise SystemExit
        assert sorted(calls) == [("one", "backup"), ("three", "backup"), ("two", "backup")]

    async def test_async_impls_run_in_tasks(self) -> None:
        calls: list[Any] = []
        impls = [
            SyncEvents(calls, "sync"),
            AsyncRaisingEvents(calls, "bad"),
            AsyncEvents(calls, "async"),
        ]
        host = PluginHost.load([], entry_points=False, extra=impls)
        with capture_logs() as logs:
            host.job_event(_event("backup"))
            # a slow notifier never delays the caller: not done yet
            assert calls == [("sync", "backup")]
            await host.drain_hooks()
        assert sorted(calls) == [("async", "backup"), ("sync", "backup")]
        failed = [e for e in logs if e["event"] == "hook_failed"]
        assert [e["error"] for e in failed] == ["RuntimeError: async notifier down"]
        assert "<bad>" in failed[0]["plugin"]

    async def test_daemon_started_awaits_async_impls(self) -> None:
        calls: list[Any] = []
        impls = [Lifecycle(calls, "x"), Lifecycle(calls, "y")]
        host = PluginHost.load([], entry_points=False, extra=impls)
        await host.daemon_started({"pid": 42, "jobs": []})
        assert sorted(calls) == [("x", "started", 42), ("y", "started", 42)]

    async def test_daemon_started_times_out_slow_impls(self) -> None:
        calls: list[Any] = []
        host = PluginHost.load(
            [], entry_points=False, extra=[SlowStart(calls, "slow"), Lifecycle(calls, "fast")]
        )
        with capture_logs() as logs:
            await asyncio.wait_for(host.daemon_started({"pid": 1}, timeout=0.2), 5)
            await asyncio.sleep(0.01)
        assert ("fast", "started", 1) in calls
        assert ("slow", "cancelled") in calls
        assert any(e["event"] == "hook_timeout" for e in logs)

    async def test_daemon_stopping_and_reloaded(self) -> None:
        calls: list[Any] = []
        host = PluginHost.load([], entry_points=False, extra=[Lifecycle(calls, "x")])
        await host.daemon_stopping({"pid": 7})
        host.config_reloaded(["new"], ["changed"], ["gone"])
        await host.drain_hooks()
        assert calls == [
            ("x", "stopping", 7),
            ("x", "reloaded", (["new"], ["changed"], ["gone"])),
        ]

    def test_has_impls(self) -> None:
        host = PluginHost.load([], entry_points=False, extra=[SyncEvents([], "a")])
        assert host.has_impls("taskd_job_event")
        assert not host.has_impls("taskd_daemon_started")

    def test_file_plugin_hooks_are_called(
        self, plugins: Plugins, recorder: types.SimpleNamespace
    ) -> None:
        folder = plugins(
            {
                "notify.py": """
                import taskd
                import taskd_test_recorder as rec

                @taskd.hookimpl
                def taskd_job_event(event):
                    if event.kind == "failed":
                        rec.calls.append((event.job, event.error))
                """
            }
        )
        host = PluginHost.load([folder], entry_points=False)
        host.job_event(_event("a", EventKind.SUCCEEDED))
        host.job_event(JobEvent(EventKind.FAILED, "b", "r", datetime.now(UTC), error="boom"))
        assert recorder.calls == [("b", "boom")]


@pytest.fixture
def dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, str]]:
    """``dist({"name": source})`` -> {name: module}: an installed-looking distribution on
    sys.path whose entry points (group "taskd") point at the given module sources."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def create(entries: dict[str, str]) -> dict[str, str]:
        tag = uuid.uuid4().hex[:8]
        info = site / f"taskd_test_dist_{tag}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: taskd-test-dist-{tag}\nVersion: 1.0\n"
        )
        modules = {name: f"taskd_test_ep_{name}_{tag}" for name in entries}
        lines = [f"{name} = {modules[name]}" for name in entries]
        (info / "entry_points.txt").write_text("[taskd]\n" + "\n".join(lines) + "\n")
        for name, source in entries.items():
            (site / f"{modules[name]}.py").write_text(textwrap.dedent(source))
        return modules

    return create


class TestEntryPoints:
    """Installed plugins (entry point group "taskd") load like files, each on its own."""

    def test_entry_point_loads(self, dist: Callable[..., dict[str, str]]) -> None:
        mods = dist({"foo": GOOD})
        host = PluginHost.load([], entry_points=True)
        rec = record(host, "foo")
        assert rec.source == "entry point"
        assert rec.origin.startswith(f"entry point foo = {mods['foo']} (taskd-test-dist-")
        assert rec.origin.endswith(" 1.0)")
        assert not rec.broken
        assert rec.job_types == ["ping", "crunch"]
        assert host.job_types["ping"].origin == rec.origin

    def test_not_loaded_when_disabled(self, dist: Callable[..., dict[str, str]]) -> None:
        dist({"foo": GOOD})
        assert "foo" not in {r.name for r in PluginHost.load([], entry_points=False).records}
        host = PluginHost.load([], entry_points=True, disabled=["foo"])
        assert "foo" not in {r.name for r in host.records}

    def test_broken_entry_point_next_to_good(self, dist: Callable[..., dict[str, str]]) -> None:
        mods = dist({"bad": "raise ImportError('needs libfoo')\n", "good": GOOD})
        with capture_logs():
            host = PluginHost.load([], entry_points=True)
        bad = record(host, "bad")
        assert bad.broken
        assert bad.error == "import failed: ImportError: needs libfoo"
        assert bad.origin.startswith(f"entry point bad = {mods['bad']}")
        assert bad.traceback is not None
        assert "needs libfoo" in bad.traceback
        assert not record(host, "good").broken
        assert "ping" in host.job_types

    def test_entry_point_and_file_conflict(
        self, dist: Callable[..., dict[str, str]], plugins: Plugins
    ) -> None:
        dist({"foo": GOOD})
        folder = plugins({"net.py": GOOD})
        with capture_logs():
            host = PluginHost.load([folder], entry_points=True)
        assert {"ping", "crunch"} <= set(host.conflicts)
        assert "entry point foo" in host.conflicts["ping"]
        assert str(folder / "net.py") in host.conflicts["ping"]


def _config(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "taskd.toml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


class _Types:
    """A builtin plugin offering a few job types for resolve tests."""

    @taskd.hookimpl
    def taskd_job_types(self) -> list[taskd.JobType]:
        return [
            taskd.JobType("http_check", _http_check),
            taskd.JobType("disk_usage", _disk_usage, kind="blocking"),
            taskd.JobType("checksum", _checksum, kind="cpu"),
        ]


async def _http_check(ctx: Any, urls: list[str], timeout: float = 5.0) -> None: ...


def _disk_usage(path: str = "/", warn_percent: float = 90.0) -> None: ...


def _checksum(path: str, algorithm: str = "sha256") -> None: ...


class TestResolve:
    """resolve(): unknown types and bad options are issues; broken plugins make broken jobs."""

    @pytest.fixture
    def host(self) -> PluginHost:
        return PluginHost.load([], entry_points=False, extra=[_Types()])

    def test_good(self, host: PluginHost, tmp_path: Path) -> None:
        cfg = _config(
            tmp_path,
            """
            [jobs.web]
            type = "http_check"
            every = "30s"
            options = { urls = ["https://example.org"], timeout = 2 }

            [jobs.disk]
            type = "disk_usage"
            cron = "0 3 * * *"
            timezone = "Europe/Berlin"

            [jobs.sum]
            type = "checksum"
            on = "startup"
            max_memory = "512MiB"
            options = { path = "/srv/big" }
            """,
        )
        specs, issues = resolve(cfg, host)
        assert issues == []
        assert list(specs) == ["web", "disk", "sum"]
        web = specs["web"]
        assert isinstance(web, JobSpec)
        assert web.name == "web"
        assert web.broken is None
        assert web.jobtype is host.job_types["http_check"]
        assert web.trigger == Every(30.0)
        assert isinstance(specs["disk"].trigger, Cron)
        assert specs["sum"].trigger is None
        assert specs["sum"].config.max_memory == 512 * 2**20

    def test_unknown_type_with_suggestion(self, host: PluginHost, tmp_path: Path) -> None:
        cfg = _config(tmp_path, '# jobs\n[jobs.web]\ntype = "http_chek"\nevery = "30s"\n')
        specs, issues = resolve(cfg, host)
        assert specs == {}
        (issue,) = issues
        assert issue.file == str(cfg.path)
        assert issue.path == "jobs.web.type"
        assert issue.message == "unknown job type 'http_chek'"
        assert issue.hint == "did you mean 'http_check'?"
        assert issue.line is not None

    def test_unknown_type_issue_is_at_the_type_line(self, host: PluginHost, tmp_path: Path) -> None:
        cfg = _config(tmp_path, '[jobs.web]\nevery = "30s"\ntype = "http_chek"\n')
        (issue,) = resolve(cfg, host)[1]
        assert issue.line == 3

    def test_unknown_type_lists_known(self, host: PluginHost, tmp_path: Path) -> None:
        cfg = _config(tmp_path, '[jobs.web]\ntype = "zzzzzz"\nevery = "30s"\n')
        (issue,) = resolve(cfg, host)[1]
        assert issue.hint == "known job types: checksum, disk_usage, http_check"

    def test_unknown_type_without_any_plugins(self, tmp_path: Path) -> None:
        cfg = _config(tmp_path, '[jobs.web]\ntype = "x"\nevery = "30s"\n')
        (issue,) = resolve(cfg, PluginHost.load([], entry_points=False))[1]
        assert issue.hint is not None
        assert "plugin_dirs" in issue.hint

    def test_unknown_type_with_a_broken_plugin_is_a_broken_job(
        self, plugins: Plugins, tmp_path: Path
    ) -> None:
        folder = plugins({"sql.py": "import no_such_driver_for_taskd_tests\n", "net.py": GOOD})
        with capture_logs():
            host = PluginHost.load([folder], entry_points=False)
        cfg = _config(
            tmp_path,
            '[jobs.q]\ntype = "sql_query"\nevery = "1m"\n[jobs.p]\ntype = "ping"\nevery = "1m"\n',
        )
        specs, issues = resolve(cfg, host)
        assert issues == []
        broken = specs["q"]
        assert broken.jobtype is None
        assert broken.broken is not None
        assert "'sql_query' not found" in broken.broken
        assert str(folder / "sql.py") in broken.broken
        assert "ModuleNotFoundError" in broken.broken
        assert broken.trigger == Every(60.0)
        assert specs["p"].broken is None

    def test_options_problems_are_issues_at_their_key(
        self, host: PluginHost, tmp_path: Path
    ) -> None:
        cfg = _config(
            tmp_path,
            """
            [jobs.web]
            type = "http_check"
            every = "30s"
            [jobs.web.options]
            urls = "https://example.org"
            timeot = 3
            """,
        )
        specs, issues = resolve(cfg, host)
        assert "web" not in specs
        by_path = {i.path: i for i in issues}
        assert set(by_path) == {"jobs.web.options.urls", "jobs.web.options.timeot"}
        assert "expected an array" in by_path["jobs.web.options.urls"].message
        assert by_path["jobs.web.options.timeot"].hint == "did you mean 'timeout'?"
        assert all(i.file == str(cfg.path) for i in issues)

    def test_options_issue_is_at_the_option_line(self, host: PluginHost, tmp_path: Path) -> None:
        cfg = _config(
            tmp_path,
            '[jobs.web]\ntype = "http_check"\nevery = "30s"\n[jobs.web.options]\nurls = 5\n',
        )
        (issue,) = resolve(cfg, host)[1]
        assert issue.path == "jobs.web.options.urls"
        assert issue.line == 5

    def test_missing_required_option(self, host: PluginHost, tmp_path: Path) -> None:
        cfg = _config(tmp_path, '[jobs.sum]\ntype = "checksum"\nevery = "1h"\n')
        (issue,) = resolve(cfg, host)[1]
        assert issue.path == "jobs.sum.options.path"
        assert "missing required option 'path'" in issue.message

    def test_max_memory_on_a_non_cpu_job(self, host: PluginHost, tmp_path: Path) -> None:
        cfg = _config(
            tmp_path, '[jobs.d]\ntype = "disk_usage"\nevery = "1h"\nmax_memory = "1GiB"\n'
        )
        specs, issues = resolve(cfg, host)
        assert "d" not in specs
        (issue,) = issues
        assert issue.path == "jobs.d.max_memory"
        assert "cpu jobs only" in issue.message
        assert "'disk_usage' is a blocking job" in issue.message
        assert issue.hint == "remove max_memory"

    def test_every_job_is_checked(self, host: PluginHost, tmp_path: Path) -> None:
        cfg = _config(
            tmp_path,
            """
            [jobs.a]
            type = "nope"
            every = "1h"
            [jobs.b]
            type = "disk_usage"
            every = "1h"
            options = { warn_percent = "high" }
            [jobs.c]
            type = "http_check"
            every = "1h"
            max_memory = "1GiB"
            options = { urls = [] }
            [jobs.ok]
            type = "disk_usage"
            every = "1h"
            """,
        )
        specs, issues = resolve(cfg, host)
        assert list(specs) == ["ok"]
        assert [i.path for i in issues] == [
            "jobs.a.type",
            "jobs.b.options.warn_percent",
            "jobs.c.max_memory",
        ]


class CancellingEvents(_Rec):
    @taskd.hookimpl
    def taskd_job_event(self, event: JobEvent) -> None:
        self.calls.append((self.label, event.job))
        raise asyncio.CancelledError  # e.g. .result() on a cancelled future


class Wrapping(_Rec):
    @taskd.hookimpl(hookwrapper=True)
    def taskd_job_event(self, event: JobEvent) -> Any:
        yield


class AsyncTypes(_Rec):
    @taskd.hookimpl
    async def taskd_job_types(self) -> list[Any]:
        return []


class TestHookForms:
    """What a plugin's hooks may raise or be, found in review."""

    def test_cancelled_error_from_a_sync_hook_is_contained(self) -> None:
        calls: list[Any] = []
        host = PluginHost.load(
            [], entry_points=False, extra=[CancellingEvents(calls, "one"), SyncEvents(calls, "two")]
        )
        with capture_logs() as logs:
            host.job_event(_event("backup"))  # must not raise into the run
        assert ("two", "backup") in calls
        assert any(e["event"] == "hook_failed" and "CancelledError" in e["error"] for e in logs)

    @pytest.mark.parametrize(
        ("cls", "why"), [(Wrapping, "hook wrappers"), (AsyncTypes, "plain def")]
    )
    def test_unusable_hook_forms_make_the_plugin_broken(self, cls: type, why: str) -> None:
        host = PluginHost.load([], entry_points=False, extra=[cls([], "x")])
        (rec,) = host.records
        assert rec.broken and why in (rec.error or "")

    def test_same_object_twice_does_not_break_the_first(self) -> None:
        module = types.ModuleType("twice")
        exec(
            "import taskd\n"
            "def run() -> None: ...\n"
            "@taskd.hookimpl\n"
            "def taskd_job_types():\n"
            "    return [taskd.JobType('twice', run, kind='blocking')]\n",
            module.__dict__,
        )
        host = PluginHost.load([], entry_points=False, extra=[module, module])
        first, second = host.records
        assert not first.broken and first.job_types == ["twice"]
        assert second.broken and "already loaded" in (second.error or "")
        assert "twice" in host.job_types


class TestStillLoading:
    """A module still executing from a timed-out reload is not handed out half-made."""

    def test_loading_module_is_refused(self, tmp_path: Path) -> None:
        from taskd.plugin import dropin

        path = tmp_path / "slow.py"
        path.write_text("X = 1\n")
        (file,) = dropin.scan((tmp_path,))[0]
        half = types.ModuleType(file.module_name)
        setattr(half, dropin.LOADING, True)
        sys.modules[file.module_name] = half
        try:
            with pytest.raises(ImportError, match="still being imported by an earlier reload"):
                dropin.load(file)
        finally:
            del sys.modules[file.module_name]


# -- issue 8, item 5: what a plugin raises, wherever it runs ----------------------------------


class AsyncExiting(_Rec):
    """An async event hook that raises ``self.exc`` (a BaseException, set per test)."""

    exc: BaseException = SystemExit(9)

    @taskd.hookimpl
    async def taskd_job_event(self, event: JobEvent) -> None:
        await asyncio.sleep(0)
        self.calls.append((self.label, event.job))
        raise self.exc


def _loop_factories() -> list[Any]:
    import uvloop

    return [
        pytest.param(asyncio.new_event_loop, id="asyncio"),
        pytest.param(uvloop.new_event_loop, id="uvloop"),
    ]


def _run_alone(factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> BaseException | None:
    """Run ``coro`` on a loop of its own; what escaped run_until_complete, if anything (a
    SystemExit that escaped pytest-asyncio's loop would end the test session)."""
    loop = factory()
    try:
        loop.run_until_complete(coro)
        return None
    except BaseException as exc:
        return exc
    finally:
        loop.close()


class TestAsyncHookExits:
    """SystemExit and KeyboardInterrupt from an async hook are that hook's failure: asyncio
    re-raises them out of the loop from any task, so the hook must not run in one of its own."""

    @pytest.mark.parametrize("factory", _loop_factories())
    @pytest.mark.parametrize(
        "exc", [SystemExit(9), KeyboardInterrupt("bye")], ids=["SystemExit", "KeyboardInterrupt"]
    )
    def test_contained_and_logged(
        self, factory: Callable[[], asyncio.AbstractEventLoop], exc: BaseException
    ) -> None:
        calls: list[Any] = []
        bad = AsyncExiting(calls, "bad")
        bad.exc = exc
        host = PluginHost.load([], entry_points=False, extra=[bad, AsyncEvents(calls, "good")])

        async def deliver() -> None:
            host.job_event(_event("backup"))
            await host.drain_hooks()

        with capture_logs() as logs:
            escaped = _run_alone(factory, deliver())
        assert escaped is None
        assert sorted(calls) == [("bad", "backup"), ("good", "backup")]
        (failed,) = [e for e in logs if e["event"] == "hook_failed"]
        assert "<bad>" in failed["plugin"]
        assert failed["error"] == f"{type(exc).__name__}: {exc}"

    async def test_cancelled_error_of_its_own_is_its_failure(self) -> None:
        calls: list[Any] = []
        bad = AsyncExiting(calls, "bad")
        bad.exc = asyncio.CancelledError("from a cancelled future")
        host = PluginHost.load([], entry_points=False, extra=[bad])
        with capture_logs() as logs:
            host.job_event(_event("backup"))
            await host.drain_hooks()
        assert [e["error"] for e in logs if e["event"] == "hook_failed"] == [
            "CancelledError: from a cancelled future"
        ]

    async def test_timeout_error_of_its_own_is_not_a_timeout(self) -> None:
        calls: list[Any] = []
        bad = AsyncExiting(calls, "bad")
        bad.exc = TimeoutError("upstream timed out")
        host = PluginHost.load([], entry_points=False, extra=[bad])
        with capture_logs() as logs:
            host.job_event(_event("backup"))
            await host.drain_hooks()
        assert [e["event"] for e in logs] == ["hook_failed"]
        assert logs[0]["error"] == "TimeoutError: upstream timed out"


class TestRunMain:
    """taskd.loop.run_main: a SystemExit or KeyboardInterrupt that another task or callback
    raises out of run_until_complete is reported, and the main task runs on to its end."""

    @pytest.mark.parametrize("factory", _loop_factories())
    def test_task_raising_system_exit(
        self, factory: Callable[[], asyncio.AbstractEventLoop]
    ) -> None:
        from taskd.loop import Stray, run_main

        async def give_up() -> None:
            raise SystemExit(4)

        async def main() -> str:
            for _ in range(3):
                asyncio.get_running_loop().create_task(give_up(), name="plugin-task")
                await asyncio.sleep(0.01)
            return "done"

        strays: list[Stray] = []
        loop = factory()
        try:
            assert run_main(loop, main(), strays.append) == "done"
        finally:
            loop.close()
        assert len(strays) == 3
        for stray in strays:
            assert isinstance(stray.exc, SystemExit) and stray.exc.code == 4
            assert stray.task == "plugin-task"
            assert stray.coro is not None and stray.coro.startswith(
                "TestRunMain.test_task_raising_system_exit.<locals>.give_up ("
            )
            assert stray.files[0] == __file__

    @pytest.mark.parametrize("factory", _loop_factories())
    def test_callback_raising_system_exit(
        self, factory: Callable[[], asyncio.AbstractEventLoop]
    ) -> None:
        from taskd.loop import Stray, run_main

        def quit_now() -> None:
            raise SystemExit("from a callback")

        async def main() -> int:
            asyncio.get_running_loop().call_soon(quit_now)
            await asyncio.sleep(0.01)
            return 7

        strays: list[Stray] = []
        loop = factory()
        try:
            assert run_main(loop, main(), strays.append) == 7
        finally:
            loop.close()
        (stray,) = strays
        assert stray.task is None
        assert stray.coro is not None and "quit_now (" in stray.coro

    def test_main_task_own_exit_is_raised(self) -> None:
        from taskd.loop import run_main

        async def main() -> None:
            raise SystemExit(3)

        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(SystemExit) as info:
                run_main(loop, main(), lambda stray: pytest.fail(f"reported {stray}"))
        finally:
            loop.close()
        assert info.value.code == 3

    def test_keyboard_interrupt_without_our_sigint_handler_is_raised(self) -> None:
        # No SIGINT handler on the loop (before the daemon's, or after it is removed): a
        # KeyboardInterrupt may be a real Ctrl-C, and is not swallowed.
        import signal

        from taskd.loop import run_main

        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        async def interrupt() -> None:
            raise KeyboardInterrupt

        async def main() -> None:
            asyncio.get_running_loop().create_task(interrupt())
            await asyncio.sleep(0.05)

        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(KeyboardInterrupt):
                run_main(loop, main(), lambda stray: pytest.fail(f"reported {stray}"))
            left = asyncio.all_tasks(loop)  # main, left suspended: end it quietly
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        finally:
            loop.close()

    @pytest.mark.parametrize("factory", _loop_factories())
    def test_real_sigint_goes_to_the_loop_handler(
        self, factory: Callable[[], asyncio.AbstractEventLoop]
    ) -> None:
        import signal

        from taskd.loop import run_main

        async def main() -> str:
            loop = asyncio.get_running_loop()
            got = asyncio.Event()
            loop.add_signal_handler(signal.SIGINT, got.set)
            try:
                signal.raise_signal(signal.SIGINT)
                await asyncio.wait_for(got.wait(), 2)
            finally:
                loop.remove_signal_handler(signal.SIGINT)
            return "stopped by SIGINT"

        loop = factory()
        try:
            assert (
                run_main(loop, main(), lambda stray: pytest.fail(f"reported {stray}"))
                == "stopped by SIGINT"
            )
        finally:
            loop.close()

    @pytest.mark.parametrize("factory", _loop_factories())
    def test_signal_while_the_loop_was_left_is_not_lost(
        self, factory: Callable[[], asyncio.AbstractEventLoop]
    ) -> None:
        # uvloop stops listening for signals between two run_until_complete calls: a SIGTERM
        # then was only acted on at the next signal, and a daemon would not stop.
        import signal

        from taskd.loop import Stray, run_main

        async def give_up() -> None:
            raise SystemExit(4)

        async def main() -> bool:
            loop = asyncio.get_running_loop()
            got = asyncio.Event()
            loop.add_signal_handler(signal.SIGUSR1, got.set)
            try:
                raising = loop.create_task(give_up())
                try:
                    await asyncio.wait_for(got.wait(), 2)
                except TimeoutError:
                    return False
                return raising.done()
            finally:
                loop.remove_signal_handler(signal.SIGUSR1)

        def stray(_: Stray) -> None:
            signal.raise_signal(signal.SIGUSR1)  # the loop is not running now

        loop = factory()
        try:
            assert run_main(loop, main(), stray) is True
        finally:
            loop.close()


class TestPluginOf:
    """Which plugin a traceback's files belong to."""

    def test_dropin_file(self, plugins: Plugins) -> None:
        folder = plugins({"a.py": GOOD, "b.py": "import taskd\n"})
        host = PluginHost.load([folder], entry_points=False)
        b = str(folder / "b.py")
        assert host.plugin_of(["/usr/lib/python3/asyncio/tasks.py", b]) == f"file:{b}"
        assert host.plugin_of([b, str(folder / "a.py")]) == f"file:{b}"  # outermost first

    def test_package_plugin(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        pkg = tmp_path / "taskd_test_pkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("import taskd\n")
        (pkg / "notify.py").write_text("X = 1\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import importlib

        module = importlib.import_module("taskd_test_pkg")
        host = PluginHost.load([], entry_points=False, extra=[module])
        assert host.plugin_of([str(pkg / "notify.py")]) is not None
        assert host.plugin_of([str(tmp_path / "elsewhere.py")]) is None
