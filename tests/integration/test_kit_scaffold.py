"""``taskd new-plugin NAME`` as a new plugin author uses it: the written plugin and its tests
pass as written (pytest in a subprocess, in a folder of their own), the folder works as a
plugin_dirs entry (`taskd check`, `taskd exec` of each job), and the tests really test: a
cpu job broken so that its result no longer pickles fails them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli

NAME = "disk_watch"


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest on the written test file, in its folder: no ini file, none of our conftests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def scaffold(tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "plugins.d"
    result = run_cli("new-plugin", NAME, "-d", str(folder))
    assert result.returncode == 0, result.stderr
    return folder, result.stdout


class TestScaffold:
    """The files written, and that they pass as written."""

    def test_writes_plugin_and_tests(self, scaffold: tuple[Path, str]) -> None:
        folder, out = scaffold
        assert sorted(p.name for p in folder.iterdir()) == [f"{NAME}.py", f"test_{NAME}.py"]
        assert f"wrote {folder / (NAME + '.py')}" in out
        assert f"pytest {folder / ('test_' + NAME + '.py')}" in out

    def test_its_tests_pass(self, scaffold: tuple[Path, str]) -> None:
        folder, _ = scaffold
        result = _pytest(folder, f"test_{NAME}.py")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "6 passed" in result.stdout

    def test_its_tests_catch_a_cpu_job_that_does_not_pickle(
        self, scaffold: tuple[Path, str]
    ) -> None:
        folder, _ = scaffold
        plugin = folder / f"{NAME}.py"
        text = plugin.read_text()
        broken = text.replace(
            'return {"path": str(path), algorithm: h.hexdigest()}', "return h  # type: ignore"
        )
        assert broken != text
        plugin.write_text(broken)
        result = _pytest(folder, f"test_{NAME}.py")
        assert result.returncode == 1
        assert "1 failed, 5 passed" in result.stdout
        assert "could not be pickled" in result.stdout

    def test_without_pytest_asyncio_the_fixtures_say_what_to_install(
        self, scaffold: tuple[Path, str]
    ) -> None:
        folder, _ = scaffold
        result = _pytest(folder, "-p", "no:asyncio", f"test_{NAME}.py")
        assert result.returncode == 1
        assert "need pytest-asyncio: pip install pytest-asyncio" in result.stdout

    def test_the_printed_config_checks_and_each_job_execs(
        self, scaffold: tuple[Path, str], tmp_path: Path
    ) -> None:
        _, out = scaffold
        # The config the scaffold tells the author to add, as printed (indented block).
        block = out.split("add to your taskd.toml:\n", 1)[1].split("\n  then:", 1)[0]
        config = tmp_path / "taskd.toml"
        snippet = "\n".join(line[4:] for line in block.splitlines())
        text = snippet.replace(
            "[daemon]\n",
            '[daemon]\nstate_dir = "state"\nruntime_dir = "run"\nentry_points = false\n',
        )
        config.write_text(text)
        result = run_cli("check", "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert "3 jobs (1 blocking, 1 cpu, 1 io)" in result.stdout
        data = tmp_path / "data.txt"
        data.write_text("hello\n")
        for job, extra in [
            ("disk-watch-hello", ()),
            ("disk-watch-disk", ("-o", "min_free_gib=0")),
            ("disk-watch-digest", ("-o", f"path={data}")),
        ]:
            result = run_cli("exec", job, "--json", *extra, "-c", str(config))
            assert result.returncode == 0, (job, result.stderr)
            assert json.loads(result.stdout)["outcome"] == "succeeded"

    def test_plugin_passes_mypy_strict(self, scaffold: tuple[Path, str], tmp_path: Path) -> None:
        folder, _ = scaffold
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--strict",
                "--cache-dir",
                str(tmp_path / "mypy-cache"),
                str(folder / f"{NAME}.py"),
                str(folder / f"test_{NAME}.py"),
            ],
            # An editable install is invisible to mypy outside the checkout: point it there.
            env={**os.environ, "MYPYPATH": str(REPO)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr


class TestRefusals:
    """Names that cannot work, and files that exist, are refused with the reason."""

    @pytest.mark.parametrize(
        "name", ["Disk", "1disk", "disk-watch", "class", "test_disk", "a" * 31]
    )
    def test_bad_names(self, tmp_path: Path, name: str) -> None:
        result = run_cli("new-plugin", name, "-d", str(tmp_path))
        assert result.returncode == 1
        assert "is not a usable plugin name" in result.stderr
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            # Its file would shadow the module of that name on pytest's sys.path (the test
            # folder goes first), so the scaffold's own tests fail as written.
            ("json", "standard library module 'json'"),
            ("asyncio", "standard library module 'asyncio'"),
            ("taskd", "module 'taskd'"),
            ("pytest", "module 'pytest'"),
            ("aiohttp", "module 'aiohttp'"),
            # Drop-in folders skip pytest's files, so the plugin would never be loaded.
            ("x_test", "ends with '_test'"),
            ("conftest", "'conftest'"),
        ],
    )
    def test_names_that_shadow_or_are_skipped(self, tmp_path: Path, name: str, reason: str) -> None:
        result = run_cli("new-plugin", name, "-d", str(tmp_path))
        assert result.returncode == 1
        assert "is not a usable plugin name" in result.stderr
        assert reason in result.stderr, result.stderr
        assert list(tmp_path.iterdir()) == []

    def test_force_over_its_own_plugin_in_the_current_folder(
        self, scaffold: tuple[Path, str]
    ) -> None:
        # Run from the plugin's folder, the plugin itself is importable by its name: that is
        # the file being overwritten, not a module it would shadow.
        folder, _ = scaffold
        result = run_cli("new-plugin", NAME, "-d", ".", "--force", cwd=folder)
        assert result.returncode == 0, result.stderr

    def test_existing_files_are_kept(self, scaffold: tuple[Path, str]) -> None:
        folder, _ = scaffold
        plugin = folder / f"{NAME}.py"
        plugin.write_text("# mine\n")
        result = run_cli("new-plugin", NAME, "-d", str(folder))
        assert result.returncode == 1
        assert re.search(r"already exists?; .*--force", result.stderr)
        assert plugin.read_text() == "# mine\n"
        result = run_cli("new-plugin", NAME, "-d", str(folder), "--force")
        assert result.returncode == 0
        assert "taskd.hookimpl" in plugin.read_text()
