"""Start-up does its work once: the config file is read once, a job type's signature is
worked out once however many jobs use it."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path
from typing import Any

import pytest

from taskd.config import load_config
from taskd.daemon import Daemon
from taskd.plugin.manager import PluginHost
from taskd.plugin.resolve import resolve
from taskd.reload import load_all

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
