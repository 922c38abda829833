"""Finding the daemon's directories from the config, even a broken or missing one."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

from taskd.cli.common import daemon_dirs, locate_daemon_dirs
from taskd.config import DaemonConfig

DEFAULTS = (DaemonConfig().state_dir, DaemonConfig().runtime_dir)


def args(config: Path | None, **extra: str | None) -> argparse.Namespace:
    return argparse.Namespace(config=str(config) if config else None, **extra)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


GOOD = """
[daemon]
state_dir = "var/state"
runtime_dir = "/tmp/taskd-test-run"
"""


class TestValidConfig:
    """A valid config is read by the real loader."""

    def test_relative_to_the_config_folder(self, tmp_path: Path) -> None:
        cfg = write(tmp_path / "etc" / "taskd.toml", GOOD)
        dirs = locate_daemon_dirs(args(cfg))
        assert (dirs.state_dir, dirs.runtime_dir) == (
            tmp_path / "etc" / "var" / "state",
            Path("/tmp/taskd-test-run"),
        )
        assert dirs.config is not None
        assert dirs.config_error is None
        assert dirs.origin == str(cfg)

    def test_unset_keys_are_the_defaults(self, tmp_path: Path) -> None:
        cfg = write(tmp_path / "taskd.toml", '[jobs.a]\ntype = "x"\nevery = "1m"\n')
        assert daemon_dirs(args(cfg)) == DEFAULTS

    def test_taskd_config_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = write(tmp_path / "env.toml", GOOD)
        monkeypatch.setenv("TASKD_CONFIG", str(cfg))
        assert daemon_dirs(args(None))[0] == tmp_path / "var" / "state"


class TestInvalidConfig:
    """A config with an error elsewhere still names its directories."""

    def test_typo_elsewhere(self, tmp_path: Path) -> None:
        good = write(tmp_path / "a" / "taskd.toml", GOOD)
        bad = write(tmp_path / "a" / "bad.toml", GOOD + 'log_levle = "debug"\n[jobs.x]\nevry = 1\n')
        dirs = locate_daemon_dirs(args(bad))
        # Resolved exactly as the loader resolves the valid file next to it.
        assert (dirs.state_dir, dirs.runtime_dir) == daemon_dirs(args(good))
        assert dirs.config is None
        assert dirs.config_error is not None
        assert any("log_levle" in str(i) for i in dirs.config_error.issues)
        assert dirs.origin == f"{bad}, read as written since the file is invalid"

    def test_home_is_expanded(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        cfg = write(tmp_path / "t.toml", '[daemon]\nstate_dir = "~/st"\nbogus = 1\n')
        assert daemon_dirs(args(cfg))[0] == tmp_path / "home" / "st"

    @pytest.mark.parametrize(
        "daemon",
        [
            "[daemon]\nstate_dir = 5\nruntime_dir = []\nbogus = 1\n",
            '[daemon]\nstate_dir = ""\nruntime_dir = ""\nbogus = 1\n',
            'daemon = "not a table"\n',
        ],
    )
    def test_unusable_values_fall_back_to_the_defaults(self, tmp_path: Path, daemon: str) -> None:
        cfg = write(tmp_path / "t.toml", daemon)
        dirs = locate_daemon_dirs(args(cfg))
        assert (dirs.state_dir, dirs.runtime_dir) == DEFAULTS
        assert "the default" in dirs.origin

    def test_one_usable_one_not(self, tmp_path: Path) -> None:
        cfg = write(tmp_path / "t.toml", '[daemon]\nstate_dir = "s"\nruntime_dir = 3\n')
        assert daemon_dirs(args(cfg)) == (tmp_path / "s", DEFAULTS[1])

    @pytest.mark.parametrize(
        "content", [b"[daemon\nstate_dir = 'x'\n", b"\x89PNG\r\n\x1a\n\x00", b""]
    )
    def test_not_toml(self, tmp_path: Path, content: bytes) -> None:
        cfg = tmp_path / "t.toml"
        cfg.write_bytes(content)
        if content == b"":  # an empty file is valid TOML: all defaults, no error
            assert locate_daemon_dirs(args(cfg)).config_error is None
        assert daemon_dirs(args(cfg)) == DEFAULTS

    def test_missing_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "nowhere.toml"
        dirs = locate_daemon_dirs(args(missing))
        assert (dirs.state_dir, dirs.runtime_dir) == DEFAULTS
        assert dirs.config_path == missing
        assert dirs.origin == f"the default, since {missing} does not exist"


class TestExplicit:
    """--state-dir / --runtime-dir, where a command has them, win over the config."""

    def test_flags_win(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = write(tmp_path / "taskd.toml", GOOD)
        monkeypatch.chdir(tmp_path)
        dirs = locate_daemon_dirs(args(cfg, state_dir="here", runtime_dir="/r"))
        assert (dirs.state_dir, dirs.runtime_dir) == (tmp_path / "here", Path("/r"))
        assert dirs.origin == "--state-dir"
        assert dirs.config is not None  # still loaded: the command may want its jobs

    def test_flags_with_a_missing_config(self, tmp_path: Path) -> None:
        dirs = locate_daemon_dirs(args(tmp_path / "none.toml", state_dir=str(tmp_path)))
        assert (dirs.state_dir, dirs.runtime_dir) == (tmp_path, DEFAULTS[1])
