"""sshd's StrictModes for plugin folders and the config file: a plugin file, its folder, a
symlink's target or the config that others could change is refused (named, with the fix),
never imported; its jobs show as broken and the rest loads; a refused config is a config
error at start (exit 78) and on reload (the old config keeps running)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.helpers import DaemonProc, daemon_table, run_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")

NOBODY = 65534

# Leaves a marker when imported: the proof that a refused file's code never ran.
EVIL = """
import pathlib

import taskd

pathlib.Path(__file__).with_suffix(".ran").write_text("imported")


async def evil(ctx) -> str:
    return "ran"


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("evil", evil)]
"""
GOOD = """
import taskd


async def good(ctx) -> str:
    return "ok"


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("good", good)]
"""
CONFIG = """
[jobs.bad]
type = "evil"
on = "startup"

[jobs.fine]
type = "good"
on = "startup"
"""


def make(daemon_factory) -> DaemonProc:
    d: DaemonProc = daemon_factory(CONFIG, {"evil.py": EVIL, "good.py": GOOD})
    return d


def check_errors(d: DaemonProc) -> list[str]:
    out = run_cli("check", "--json", "-c", str(d.config_path))
    assert out.returncode == 1, out
    return list(json.loads(out.stdout)["errors"])


def assert_refused(d: DaemonProc, path: Path, fix: str) -> None:
    """The daemon starts, never imports evil.py, shows `bad` broken naming ``path`` and the
    fix, and runs `fine`; `taskd check` says the same."""
    d.start()
    d.wait_for("run", job="fine", outcome="succeeded")
    evil = d.dir / "plugins.d" / "evil.py"
    assert not evil.with_suffix(".ran").exists(), "the refused plugin was imported"
    (broken,) = d.events("plugin_broken")
    assert broken["origin"] == str(evil) and str(path) in broken["error"], broken
    assert fix in broken["error"], broken
    (started,) = d.events("started")
    assert started["broken"] == ["bad"], started
    assert not d.events("run", job="bad")
    assert d.stop() == 0
    errors = check_errors(d)
    assert any(str(evil) in e and fix in e for e in errors), errors
    assert not evil.with_suffix(".ran").exists()


class TestPluginFiles:
    """A plugin file others could change is refused; the rest of the folder loads."""

    def test_group_writable_file(self, daemon_factory) -> None:
        d = make(daemon_factory)
        evil = d.dir / "plugins.d" / "evil.py"
        evil.chmod(0o664)  # what a umask 002 user's editor leaves
        assert_refused(d, evil, f"chmod go-w {evil}")

    def test_file_of_another_user(self, daemon_factory) -> None:
        d = make(daemon_factory)
        evil = d.dir / "plugins.d" / "evil.py"
        os.chown(evil, NOBODY, NOBODY)
        assert_refused(d, evil, f"chown root {evil}")

    def test_writable_folder(self, daemon_factory) -> None:
        """Every file of a folder others can write is refused; the other folders load."""
        d = make(daemon_factory)
        d.write_config(
            daemon_table(plugin_dirs='["plugins.d", "open.d"]') + CONFIG.replace("evil", "evil2")
        )
        folder = d.dir / "open.d"
        folder.mkdir()
        folder.chmod(0o777)
        (folder / "evil2.py").write_text(EVIL.replace('"evil"', '"evil2"'))
        d.start()
        d.wait_for("run", job="fine", outcome="succeeded")
        assert not (folder / "evil2.ran").exists()
        (broken,) = d.events("plugin_broken")
        assert broken["origin"] == str(folder / "evil2.py"), broken
        assert f"chmod go-w {folder}" in broken["error"], broken
        # Also a folder problem, which names a folder with no .py file in it yet.
        (problem,) = d.events("plugin_folder_problem")
        assert problem["path"] == str(folder) and f"chmod go-w {folder}" in problem["problem"]
        assert d.stop() == 0
        assert any(f"chmod go-w {folder}" in e for e in check_errors(d))

    def test_symlink_to_a_file_in_an_open_folder(self, daemon_factory, tmp_path: Path) -> None:
        """A link leaving the folder is followed only to a target that passes the checks,
        the folders on the target's path included."""
        d = make(daemon_factory)
        open_dir = tmp_path / "shared"
        open_dir.mkdir()
        open_dir.chmod(0o777)  # anyone may swap the file for another
        target = open_dir / "evil.py"
        evil = d.dir / "plugins.d" / "evil.py"
        target.write_text(evil.read_text())
        evil.unlink()
        evil.symlink_to(target)
        assert_refused(d, open_dir, f"chmod go-w {open_dir}")

    def test_symlink_to_a_safe_file_loads(self, daemon_factory, tmp_path: Path) -> None:
        d = make(daemon_factory)
        safe = tmp_path / "lib"
        safe.mkdir()
        target = safe / "evil.py"
        evil = d.dir / "plugins.d" / "evil.py"
        target.write_text(evil.read_text())
        evil.unlink()
        evil.symlink_to(target)
        d.start()
        d.wait_for("run", job="bad", outcome="succeeded")
        assert evil.with_suffix(".ran").exists()  # __file__ is the link
        assert not d.events("plugin_broken")
        assert d.stop() == 0

    def test_reload_rejects_a_file_made_writable(self, daemon_factory) -> None:
        """A plugin that jobs use, made group-writable: the reload is refused, the jobs run on."""
        d = make(daemon_factory).start()
        d.wait_for("run", job="bad", outcome="succeeded")
        evil = d.dir / "plugins.d" / "evil.py"
        evil.with_suffix(".ran").unlink()
        evil.write_text(evil.read_text() + "\n# edited\n")
        evil.chmod(0o666)
        d.signal(signal.SIGHUP)
        (failed,) = d.wait_for("reload_failed")
        assert any(f"chmod go-w {evil}" in e for e in failed["errors"]), failed
        assert not evil.with_suffix(".ran").exists()
        assert d.stop() == 0


class TestConfigFile:
    """The config file decides which folders code is run from: the same checks apply."""

    @pytest.mark.parametrize("how", ["group-writable", "another user"])
    def test_run_refuses_it(self, daemon_factory, how: str) -> None:
        d = make(daemon_factory)
        if how == "group-writable":
            d.config_path.chmod(0o664)
            fix = f"chmod go-w {d.config_path}"
        else:
            os.chown(d.config_path, NOBODY, NOBODY)
            fix = f"chown root {d.config_path}"
        d.start(wait=False)
        assert d.wait_exit(timeout=20) == 78
        text = "\n".join(d.raw)
        assert fix in text and "refused" in text, text
        assert not (d.dir / "plugins.d" / "evil.ran").exists()
        out = run_cli("check", "-c", str(d.config_path))
        assert out.returncode == 1 and fix in out.stderr, out

    def test_config_in_an_open_folder(self, daemon_factory) -> None:
        d = make(daemon_factory)
        d.dir.chmod(0o777)  # anyone could replace taskd.toml
        d.start(wait=False)
        assert d.wait_exit(timeout=20) == 78
        text = "\n".join(d.raw)
        assert f"chmod go-w {d.dir}" in text, text

    def test_reload_keeps_the_old_config(self, daemon_factory) -> None:
        d = make(daemon_factory).start()
        d.wait_for("run", job="fine", outcome="succeeded")
        d.config_path.chmod(0o666)
        d.signal(signal.SIGHUP)
        (failed,) = d.wait_for("reload_failed")
        assert any(f"chmod go-w {d.config_path}" in e for e in failed["errors"]), failed
        d.config_path.chmod(0o644)
        d.signal(signal.SIGHUP)
        d.wait_for("reloaded")
        assert d.stop() == 0


def test_repo_config_and_plugins_pass() -> None:
    """Normal development keeps working: the repo's own config and plugins are accepted."""
    repo = Path(__file__).resolve().parents[2]
    out = run_cli("check", "-c", str(repo / "config" / "taskd.toml"))
    assert "refused" not in out.stderr + out.stdout, out
