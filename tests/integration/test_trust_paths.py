"""The file that is checked is the file that is read: a config file, plugin folder or state_dir
reached through a folder another user controls is refused (whoever owns that folder can
repoint the link in it), and a config swapped between the check and the read is never used.
The attack of review 8, finding 1, replayed: root's daemon on a config path through another
user's folder, that user flipping the link while the daemon reloads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProc, daemon_table, poll, run_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")

NOBODY = 65534

PLUGIN = """
import taskd


async def echo(ctx) -> str:
    return "ok"


@taskd.hookimpl
def taskd_job_types():
    return [taskd.JobType("echo", echo)]
"""
GOOD = '[jobs.benign]\ntype = "echo"\nevery = "1h"\n'
# What the other user wants root to run: a job that runs at once.
EVIL = GOOD + '\n[jobs.pwn]\ntype = "echo"\non = "startup"\n'


def daemon(daemon_factory, config: str = GOOD) -> DaemonProc:
    d: DaemonProc = daemon_factory(config, {"echo.py": PLUGIN})
    return d


def others_folder(base: Path, name: str = "alice") -> Path:
    """A folder owned by another (non-root) user: that user can replace anything in it."""
    folder = base / name
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    return folder


def absolute(d: DaemonProc, config: str = GOOD) -> None:
    """Write d's config with absolute paths, for a config read from elsewhere."""
    d.write_config(
        daemon_table(
            plugin_dirs=f'["{d.dir / "plugins.d"}"]',
            state_dir=f'"{d.dir / "state"}"',
            runtime_dir=f'"{d.dir / "run"}"',
        )
        + config
    )


def config_error(d: DaemonProc) -> str:
    """Start ``d`` and expect exit 78 (a config error); the log's text."""
    d.start(wait=False)
    code = d.wait_exit(timeout=30)
    text = "\n".join(d.raw)
    assert code == 78, text
    return text


class TestConfigPath:
    """The config path as given is judged, not only the file it ends at."""

    def test_link_in_another_users_folder(self, daemon_factory, tmp_path: Path) -> None:
        """alice/cfg -> a root-owned, safe config: alice can repoint cfg at any time, so the
        path is refused, by `taskd check` and by `taskd run`."""
        d = daemon(daemon_factory)
        absolute(d)  # relative paths would be taken from alice's folder, where cfg is
        alice = others_folder(tmp_path)
        link = alice / "cfg"
        link.symlink_to(d.config_path)
        fix = f"chown root {alice}"
        out = run_cli("check", "-c", str(link))
        assert out.returncode == 1 and fix in out.stderr, out
        d.config_path = link
        text = config_error(d)
        assert fix in text and str(link) in text, text
        assert "resolves to" in text, text  # there is a symlink on the way, and it says so
        assert not d.events("started")

    def test_file_in_another_users_folder(self, daemon_factory, tmp_path: Path) -> None:
        """A safe file, no link at all, in a folder alice owns: she could swap the file."""
        d = daemon(daemon_factory)
        absolute(d)
        alice = others_folder(tmp_path)
        moved = alice / "taskd.toml"
        shutil.copy(d.config_path, moved)
        moved.chmod(0o644)
        out = run_cli("check", "-c", str(moved))
        assert out.returncode == 1 and f"chown root {alice}" in out.stderr, out

    def test_swap_between_check_and_read(self, daemon_factory, tmp_path: Path) -> None:
        """A link in a safe folder flips, as fast as it can, between the safe config and one
        another user owns (refused whenever it is the one checked). Over many reloads, the
        daemon only ever runs what it checked: the other user's job is never added."""
        d = daemon(daemon_factory)
        good = d.config_path
        evil = d.dir / "evil.toml"
        evil.write_text(daemon_table() + EVIL)
        os.chown(evil, NOBODY, NOBODY)
        link = d.dir / "cfg"
        link.symlink_to(good)
        d.config_path = link
        d.start()
        done = threading.Event()

        def flip() -> None:
            tmp = d.dir / "cfg.tmp"
            while not done.is_set():
                for target in (evil, good):
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                    tmp.symlink_to(target)
                    os.rename(tmp, link)
                    time.sleep(0.003)

        flipper = threading.Thread(target=flip, daemon=True)
        flipper.start()
        try:
            deadline = time.monotonic() + 90
            for n in range(1, 41):
                d.signal(signal.SIGHUP)
                poll(lambda n=n: len(_reload_results(d)) >= n, timeout=30)
                if d.events("reloaded") and any(
                    e.get("added") for e in d.events("reloaded")
                ):  # the unfixed daemon: it read one file and checked another
                    break
                if time.monotonic() > deadline:
                    break
        finally:
            done.set()
            flipper.join()
        added = [e for e in d.events("reloaded") if e.get("added")]
        assert not added, added
        assert len(_reload_results(d)) >= 5, "too few reloads to have raced"
        assert not d.events("run", job="pwn")
        # It did take reloads, and refused the other user's file whenever it saw it.
        assert d.events("reloaded") or d.events("reload_failed")
        for failed in d.events("reload_failed"):
            assert any(str(evil) in e or "changed" in e for e in failed["errors"]), failed
        assert d.stop() == 0


def _reload_results(d: DaemonProc) -> list[dict[str, object]]:
    return d.events("reloaded") + d.events("reload_failed")


FLIPPER = r"""
# Run as the other user: keeps cfg -> evil.toml until the daemon opens evil.toml
# (inotify IN_OPEN), then points it back at the safe config before the daemon's check.
import ctypes, os, sys
base, safe = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init()
evil = os.path.join(base, "evil.toml")
libc.inotify_add_watch(fd, evil.encode(), 0x20)  # IN_OPEN

def point(target):
    tmp = os.path.join(base, "cfg.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, os.path.join(base, "cfg"))

point(evil)
print("armed", flush=True)
os.read(fd, 4096)
point(safe)
print("flipped back", flush=True)
"""


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder under /tmp that another user can reach (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="taskd-trust-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(
    not os.access("/usr/bin/python3.11", os.X_OK), reason="needs /usr/bin/python3.11"
)
def test_other_user_flips_the_link_during_a_reload(daemon_factory, shared_tmp: Path) -> None:
    """Review 8's attack: root runs taskd on alice/cfg (-> root's safe config); alice points
    the link at her config until the daemon opens it, and back before it is checked. The
    daemon must refuse the path from the start, and never run alice's job."""
    d = daemon(daemon_factory)
    root_dir = shared_tmp / "root"
    shutil.copytree(d.dir, root_dir)
    d.dir = root_dir
    safe = d.config_path = root_dir / "taskd.toml"
    absolute(d)
    alice = others_folder(shared_tmp)
    (alice / "evil.toml").write_text(safe.read_text() + EVIL.removeprefix(GOOD))
    os.chown(alice / "evil.toml", NOBODY, NOBODY)
    link = alice / "cfg"
    link.symlink_to(safe)
    os.lchown(link, NOBODY, NOBODY)
    d.config_path = link
    d.start(wait=False)
    poll(lambda: d.events("started") or d.proc.poll() is not None, timeout=30)  # type: ignore[union-attr]
    flipper = subprocess.Popen(
        ["/usr/bin/python3.11", "-I", "-S", "-c", FLIPPER, str(alice), str(safe)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flipper.stdout is not None and flipper.stdout.readline() == "armed\n"
        if d.proc.poll() is None:  # type: ignore[union-attr]
            d.signal(signal.SIGHUP)
            poll(lambda: _reload_results(d), timeout=30)
            time.sleep(1.5)  # a run of `pwn` (on = "startup") would be logged by now
    finally:
        flipper.kill()
        flipper.wait()
        flipper.stdout.close()  # type: ignore[union-attr]
    code = d.stop()
    assert not d.events("run", job="pwn"), "alice's job ran as root"
    assert not [e for e in d.events("reloaded") if e.get("added")]
    assert not d.events("started"), "the daemon started on a path alice controls"
    assert code == 78
    assert f"chown root {alice}" in "\n".join(d.raw)


class TestPluginAndStatePaths:
    """The same for a plugin folder and for state_dir given through another user's folder."""

    def test_plugin_folder_through_another_users_link(self, daemon_factory, tmp_path: Path) -> None:
        d = daemon(daemon_factory)
        alice = others_folder(tmp_path)
        (alice / "plugins").symlink_to(d.dir / "plugins.d")
        d.write_config(daemon_table(plugin_dirs=f'["{alice / "plugins"}"]') + GOOD)
        d.start()
        (broken,) = d.events("plugin_broken")
        assert f"chown root {alice}" in broken["error"], broken
        (started,) = d.events("started")
        assert started["broken"] == ["benign"], started
        assert d.stop() == 0
        out = run_cli("check", "-c", str(d.config_path))
        assert out.returncode == 1 and f"chown root {alice}" in out.stderr, out

    def test_state_dir_through_another_users_link(self, daemon_factory, tmp_path: Path) -> None:
        d = daemon(daemon_factory)
        real = d.dir / "real-state"
        real.mkdir(mode=0o700)
        alice = others_folder(tmp_path)
        (alice / "state").symlink_to(real)
        d.write_config(daemon_table(state_dir=f'"{alice / "state"}"') + GOOD)
        d.start(wait=False)
        poll(lambda: d.events("started") or d.proc.poll() is not None, timeout=30)  # type: ignore[union-attr]
        code = d.stop()
        assert not d.events("started"), "the daemon started on a state_dir alice can repoint"
        assert code == 3
        (line,) = d.events("cannot_start")
        assert f"chown root {alice}" in line["error"], line
        out = run_cli("check", "-c", str(d.config_path))
        assert out.returncode == 1 and f"chown root {alice}" in out.stderr, out


class TestMessages:
    """A path with `..` is no symlink; "resolves to" only where there is one (finding 7)."""

    def test_dotdot_is_not_called_a_symlink(self, daemon_factory) -> None:
        d = daemon(daemon_factory)
        (d.dir / "config").mkdir()
        (d.dir / "var").mkdir()
        (d.dir / "var").chmod(0o775)
        d.write_config(daemon_table(state_dir='"config/../var/state"') + GOOD)
        d.start(wait=False)
        assert d.wait_exit(timeout=30) == 3
        (line,) = d.events("cannot_start")
        assert f"chmod go-w {d.dir / 'var'}" in line["error"], line
        assert "symlink" not in line["error"] and "resolves to" not in line["error"], line

    def test_a_real_symlink_is_named(self, daemon_factory) -> None:
        d = daemon(daemon_factory)
        (d.dir / "var").mkdir()
        (d.dir / "var").chmod(0o775)
        (d.dir / "st").symlink_to(d.dir / "var" / "state")
        (d.dir / "var" / "state").mkdir(mode=0o700)
        d.write_config(daemon_table(state_dir='"st"') + GOOD)
        d.start(wait=False)
        assert d.wait_exit(timeout=30) == 3
        (line,) = d.events("cannot_start")
        assert f"resolves to {d.dir / 'var' / 'state'}" in line["error"], line


def umask_002_checkout(d: DaemonProc) -> list[Path]:
    """The repo's layout (config/, plugins/, state under var/) as `git clone` leaves it under
    umask 002: every folder 0775, every file 0664. The paths taskd must refuse."""
    config, plugins, var = d.dir / "config", d.dir / "plugins", d.dir / "var"
    for folder in (config, plugins, var):
        folder.mkdir()
        folder.chmod(0o775)
    files = [plugins / "echo.py", plugins / "other.py"]
    files[0].write_text(PLUGIN)
    files[1].write_text(PLUGIN.replace('"echo"', '"other"'))
    cfg = config / "taskd.toml"
    cfg.write_text(daemon_table(plugin_dirs='["../plugins"]', state_dir='"../var/state"') + GOOD)
    for f in (cfg, *files):
        f.chmod(0o664)
    d.config_path = cfg
    return [config, cfg, plugins, *files, var]


def chmod_r_go_w(top: Path) -> None:
    subprocess.run(["chmod", "-R", "go-w", str(top)], check=True)


class TestOneRound:
    """Every trust problem is reported at once, with one command for those under one tree
    (review 8, finding 6): a checkout made under umask 002 takes one round of fixes."""

    def test_check_and_run_name_them_all(self, daemon_factory) -> None:
        d = daemon(daemon_factory)
        expected = umask_002_checkout(d)
        hint = f"chmod -R go-w {d.dir} fixes all {len(expected)} of these at once"
        out = run_cli("check", "-c", str(d.config_path))
        assert out.returncode == 1, out
        for path in expected:
            assert f"chmod go-w {path}\n" in out.stderr, (path, out.stderr)
        assert hint in out.stderr, out.stderr
        data = json.loads(run_cli("check", "--json", "-c", str(d.config_path)).stdout)
        assert data["hints"] == [hint], data
        assert len(data["errors"]) == len(expected), data
        text = config_error(d)
        for path in expected:
            assert f"chmod go-w {path}" in text, (path, text)
        assert hint in text, text
        assert not (d.dir / "var" / "state").exists(), "made through a refused folder"
        # The one command it offers is all it takes.
        chmod_r_go_w(d.dir)
        out = run_cli("check", "-c", str(d.config_path))
        assert out.returncode == 0, out
        d.lines.clear()
        d.start()
        assert d.stop() == 0

    def test_start_refused_on_state_dir_says_the_rest(self, daemon_factory) -> None:
        """The config was fixed alone: the start stops at state_dir, after the refused
        plugin files, and offers the one command for all of them."""
        d = daemon(daemon_factory)
        expected = umask_002_checkout(d)
        for path in expected[:2]:  # config/ and config/taskd.toml
            path.chmod(path.stat().st_mode & ~0o022)
        d.start(wait=False)
        assert d.wait_exit(timeout=30) == 3
        (line,) = d.events("cannot_start")
        assert f"chmod go-w {d.dir / 'var'}" in line["error"], line
        assert line["hint"] == f"chmod -R go-w {d.dir} fixes all 4 of these at once", line
        out = run_cli("check", "-c", str(d.config_path))
        assert out.returncode == 1, out
        assert f"hint: chmod -R go-w {d.dir} fixes all 4 of these at once" in out.stderr, out
