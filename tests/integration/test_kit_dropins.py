"""Test files beside drop-in plugins: ``test_*.py``, ``*_test.py`` and ``conftest.py`` in a
plugin folder are never loaded as plugins, so ``taskd check`` passes and the daemon starts
with the real plugin only (real CLI processes on real files)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.helpers import run_cli

PLUGIN = '''
import taskd


def ping(n: int = 1) -> int:
    """Return n."""
    return n


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("ping", ping, kind="blocking")]
'''

# What a plugin's tests look like: they import the plugin by its plain module name (pytest
# puts the folder on sys.path), which fails when the daemon loads the file as a plugin.
TEST_FILE = """
import ping_plugin

def test_ping():
    assert ping_plugin.ping(2) == 2
"""

CONFIG = """
[daemon]
plugin_dirs = ["plugins.d"]
state_dir = "state"
runtime_dir = "run"
entry_points = false

[jobs.p]
type = "ping"
every = "1h"
"""


def _project(root: Path) -> Path:
    plugins = root / "plugins.d"
    plugins.mkdir(parents=True)
    (plugins / "ping_plugin.py").write_text(textwrap.dedent(PLUGIN))
    for name in ("test_ping_plugin.py", "ping_plugin_test.py", "conftest.py"):
        (plugins / name).write_text(textwrap.dedent(TEST_FILE))
    config = root / "taskd.toml"
    config.write_text(textwrap.dedent(CONFIG).lstrip())
    return config


class TestTestFilesAreSkipped:
    """A plugin's test files next to it are not plugins."""

    def test_check_passes(self, tmp_path: Path) -> None:
        config = _project(tmp_path)
        result = run_cli("check", "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert "1 plugin" in result.stdout

    def test_plugins_lists_only_the_plugin(self, tmp_path: Path) -> None:
        config = _project(tmp_path)
        result = run_cli("plugins", "--json", "-c", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        names = [p["name"] for p in json.loads(result.stdout)["plugins"]]
        assert names == ["ping_plugin"]

    def test_exec_runs(self, tmp_path: Path) -> None:
        config = _project(tmp_path)
        result = run_cli("exec", "p", "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == 1

    def test_a_plugin_named_like_a_test_word_still_loads(self, tmp_path: Path) -> None:
        # Only the test-file patterns are skipped: "testing.py", "contest.py", "latest.py" load.
        config = _project(tmp_path)
        for name in ("testing.py", "latest.py", "contest.py"):
            (tmp_path / "plugins.d" / name).write_text("import taskd\n")
        result = run_cli("plugins", "--json", "-c", str(config))
        names = sorted(p["name"] for p in json.loads(result.stdout)["plugins"])
        assert names == ["contest", "latest", "ping_plugin", "testing"]
