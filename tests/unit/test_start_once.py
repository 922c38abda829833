"""Start-up does its work once: the config file is read once, a job type's signature is
worked out once however many jobs use it, values jobs share are kept once. A reload
validates in slices on the loop."""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import textwrap
import threading
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest

from taskd.config import load_config, steps
from taskd.config.durations import parse_duration
from taskd.daemon import Daemon
from taskd.errors import ConfigError
from taskd.plugin.manager import PluginHost
from taskd.plugin.resolve import resolve, resolve_steps
from taskd.reload import load_all, load_all_on_loop
from taskd.schedule.triggers import Every

PLUGIN = """
import taskd

async def ping(ctx, url: str, tries: int = 1) -> None:
    return None

@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("ping", ping)]
"""


def _write(tmp_path: Path, jobs: int) -> Path:
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "plugins.d" / "ping.py").write_text(PLUGIN)
    body = "".join(
        f'[jobs.j{i}]\ntype = "ping"\nevery = "1h"\noptions = {{ url = "u{i}" }}\n'
        for i in range(jobs)
    )
    path = tmp_path / "taskd.toml"
    path.write_text(
        textwrap.dedent("""
        [daemon]
        plugin_dirs = ["plugins.d"]
        state_dir = "state"
        runtime_dir = "run"
        entry_points = false
        """)
        + body
    )
    return path


class TestConfigReadOnce:
    """A config the caller has already read is not read again."""

    def test_load_all_uses_the_config_given(self, tmp_path: Path) -> None:
        path = _write(tmp_path, 3)
        config = load_config(path)
        path.unlink()  # a second read would fail now
        loaded = load_all(path, config)
        assert sorted(loaded.specs) == ["j0", "j1", "j2"]
        assert loaded.specs["j2"].kwargs == {"url": "u2"}
        assert loaded.config.lines == {}  # the line map only served error messages

    async def test_the_daemon_starts_from_its_start_config_and_drops_it(
        self, tmp_path: Path
    ) -> None:
        path = _write(tmp_path, 2)
        daemon = Daemon(path)
        daemon.start_config = load_config(path)
        path.unlink()
        loaded = await daemon._load()
        assert loaded is not None and sorted(loaded.specs) == ["j0", "j1"]
        assert daemon.start_config is None  # not kept for the daemon's lifetime
        daemon.notifier.close()

    async def test_without_a_start_config_the_daemon_reads_the_file(self, tmp_path: Path) -> None:
        path = _write(tmp_path, 1)
        daemon = Daemon(path)
        loaded = await daemon._load()
        assert loaded is not None and list(loaded.specs) == ["j0"]
        daemon.notifier.close()


class TestSignatureOncePerJobType:
    """resolve() inspects a job type's function once, not once or more per job."""

    def test_signature_per_job_type(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = _write(tmp_path, 50)
        config = load_config(path)
        host = PluginHost.load(config.daemon.plugin_dirs, entry_points=False)
        calls: list[Any] = []
        real = inspect.signature

        def counting(obj: Any, *args: Any, **kwargs: Any) -> inspect.Signature:
            calls.append(obj)
            return real(obj, *args, **kwargs)

        monkeypatch.setattr(inspect, "signature", counting)
        specs, issues = resolve(config, host)
        assert issues == [] and len(specs) == 50
        assert len(calls) == 1
        assert specs["j7"].kwargs == {"url": "u7"}

    def test_option_errors_still_name_each_job(self, tmp_path: Path) -> None:
        path = _write(tmp_path, 0)
        path.write_text(
            path.read_text()
            + '[jobs.a]\ntype = "ping"\nevery = "1h"\noptions = { tries = 2 }\n'
            + '[jobs.b]\ntype = "ping"\nevery = "1h"\noptions = { url = 3 }\n'
        )
        config = load_config(path)
        host = PluginHost.load(config.daemon.plugin_dirs, entry_points=False)
        specs, issues = resolve(config, host)
        assert specs == {}
        assert [i.path for i in issues] == ["jobs.a.options.url", "jobs.b.options.url"]


class TestReloadLoadsInSlices:
    """A reload's validation runs on the loop in slices: other tasks run between them, and
    the result (or the errors) are those of the one-go load."""

    async def test_other_tasks_run_while_a_reload_validates(self, tmp_path: Path) -> None:
        path = _write(tmp_path, 3000)
        events: list[tuple[str, int]] = []
        loading = True
        real_steps = resolve_steps

        def recorded(config: Any, host: Any) -> steps.Steps[Any]:
            inner = real_steps(config, host)
            while True:
                try:
                    next(inner)
                except StopIteration as stop:
                    return stop.value
                events.append(("step", threading.get_ident()))
                yield

        async def ticker() -> None:
            while loading:
                events.append(("tick", threading.get_ident()))
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        # Slices of a microsecond: every step yields, whatever the machine's speed.
        with (
            patch(
                "taskd.reload.finish_in_slices",
                functools.partial(steps.finish_in_slices, slice_seconds=1e-6),
            ),
            patch("taskd.reload.resolve_steps", recorded),
        ):
            loaded = await load_all_on_loop(path, timeout=60)
        loading = False
        await task
        assert len(loaded.specs) == 3000 and loaded.specs["j2999"].kwargs == {"url": "u2999"}
        assert loaded.config.lines == {}
        # Each job is a step, on the loop's own thread, and the other task ran between them.
        loop_thread = threading.get_ident()
        assert sum(1 for kind, _ in events if kind == "step") == 3000
        assert {ident for _, ident in events} == {loop_thread}
        kinds = [kind for kind, _ in events]
        assert sum(1 for a, b in itertools.pairwise(kinds) if (a, b) == ("step", "tick")) >= 2999

    async def test_a_bad_config_fails_with_the_same_errors(self, tmp_path: Path) -> None:
        path = _write(tmp_path, 5)
        path.write_text(
            path.read_text()
            + '[jobs.bad]\ntype = "ping"\nevery = "soon"\n'
            + '[jobs.opt]\ntype = "ping"\nevery = "1h"\noptions = { url = 1 }\n'
        )
        with pytest.raises(ConfigError) as sync_error:
            load_all(path)
        with pytest.raises(ConfigError) as loop_error:
            await load_all_on_loop(path, timeout=60)
        assert [str(i) for i in loop_error.value.issues] == [
            str(i) for i in sync_error.value.issues
        ]
        assert loop_error.value.issues  # the 'every' problem at least

    async def test_finish_and_finish_in_slices_agree(self) -> None:
        def count(n: int) -> steps.Steps[int]:
            total = 0
            for i in range(n):
                total += i
                yield
            return total

        assert steps.finish(count(100)) == await steps.finish_in_slices(count(100), 0.0) == 4950


class TestSharedValues:
    """What thousands of jobs have in common is kept once: an every/at trigger per distinct
    schedule, a float per duration text. A Cron, which keeps its position, stays per job."""

    def test_jobs_with_one_schedule_share_its_trigger(self, tmp_path: Path) -> None:
        path = _write(tmp_path, 20)
        path.write_text(
            path.read_text()
            + '[jobs.c1]\ntype = "ping"\ncron = "0 3 * * *"\noptions = { url = "c" }\n'
            + '[jobs.c2]\ntype = "ping"\ncron = "0 3 * * *"\noptions = { url = "c" }\n'
            + '[jobs.other]\ntype = "ping"\nevery = "2h"\noptions = { url = "o" }\n'
        )
        config = load_config(path)
        specs, issues = resolve(
            config, PluginHost.load(config.daemon.plugin_dirs, entry_points=False)
        )
        assert issues == []
        assert len({id(specs[f"j{i}"].trigger) for i in range(20)}) == 1
        assert specs["other"].trigger is not specs["j0"].trigger
        assert specs["other"].trigger == Every(7200.0)
        assert specs["c1"].trigger == specs["c2"].trigger
        assert specs["c1"].trigger is not specs["c2"].trigger

    def test_one_float_per_duration_text(self) -> None:
        assert parse_duration("1h") is parse_duration("1h") == 3600.0
        with pytest.raises(ValueError, match="cannot read"):
            parse_duration("1x")
        with pytest.raises(ValueError, match="cannot read"):  # an error is not kept as a result
            parse_duration("1x")
