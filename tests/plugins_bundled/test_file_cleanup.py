"""The bundled file_cleanup plugin, on real folders with modification times set by os.utime."""

from __future__ import annotations

import json
import os
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

import taskd

DAY = 86400


@pytest.fixture
def fc(load_plugin: Callable[[str], types.ModuleType]) -> types.ModuleType:
    return load_plugin("file_cleanup")


def make(path: Path, age_days: float, content: bytes = b"x") -> Path:
    """A file ``age_days`` old by its modification time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return path


def age_dir(path: Path, age_days: float) -> None:
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))


class TestRegistration:
    """The hook offers one blocking job type with TOML-typed options."""

    def test_job_type(
        self,
        fc: types.ModuleType,
        job_types: Callable[[types.ModuleType], list[taskd.JobType]],
        options_contract: Callable[[taskd.JobType], None],
    ) -> None:
        (job,) = job_types(fc)
        assert (job.name, job.kind, job.func) == ("file_cleanup", "blocking", fc.file_cleanup)
        options_contract(job)


class TestParseAge:
    """max_age: seconds, or a number with a unit, or several."""

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (90, 90.0),
            (1.5, 1.5),
            ("90", 90.0),
            ("45s", 45.0),
            ("30m", 1800.0),
            ("12h", 43200.0),
            ("7d", 7 * DAY),
            ("2w", 14 * DAY),
            ("1.5h", 5400.0),
            ("1h30m", 5400.0),
            ("1d 12h", 1.5 * DAY),
        ],
    )
    def test_valid(self, fc: types.ModuleType, value: str | float, seconds: float) -> None:
        assert fc.parse_age(value) == seconds

    @pytest.mark.parametrize("value", ["", "7x", "d", "7D", "-1d", "1d-", "1.d", "one day"])
    def test_not_a_duration(self, fc: types.ModuleType, value: str) -> None:
        with pytest.raises(ValueError, match="is not a duration"):
            fc.parse_age(value)

    @pytest.mark.parametrize("value", [0, 0.0, "0", "0d", -5, float("inf"), float("nan")])
    def test_not_more_than_zero(self, fc: types.ModuleType, value: str | float) -> None:
        with pytest.raises(ValueError, match="must be more than zero"):
            fc.parse_age(value)

    def test_bool_is_not_a_number_here(self, fc: types.ModuleType) -> None:
        with pytest.raises(TypeError, match="'max_age'"):
            fc.parse_age(True)


class TestRemoval:
    """Files older than max_age and matching the pattern go; everything else stays."""

    def test_old_files_go_new_ones_stay(self, fc: types.ModuleType, tmp_path: Path) -> None:
        old = make(tmp_path / "old.log", 10, b"12345")
        older = make(tmp_path / "older.log", 30, b"123")
        new = make(tmp_path / "new.log", 1)
        result = fc.file_cleanup(path=str(tmp_path), max_age="7d")
        assert not old.exists()
        assert not older.exists()
        assert new.exists()
        assert result == {
            "removed": 2,
            "bytes": 8,
            "dirs_removed": 0,
            "dry_run": False,
            "sample": [str(old), str(older)],
            "path": str(tmp_path),
            "max_age": 7 * DAY,
        }
        assert json.loads(json.dumps(result)) == result

    def test_dry_run_removes_nothing(self, fc: types.ModuleType, tmp_path: Path) -> None:
        old = make(tmp_path / "old.log", 10, b"12345")
        result = fc.file_cleanup(path=str(tmp_path), max_age=7 * DAY, dry_run=True)
        assert old.exists()
        assert (result["removed"], result["bytes"], result["dry_run"]) == (1, 5, True)
        assert result["sample"] == [str(old)]

    def test_pattern_matches_names(self, fc: types.ModuleType, tmp_path: Path) -> None:
        log = make(tmp_path / "a.log", 10)
        txt = make(tmp_path / "a.txt", 10)
        hidden = make(tmp_path / ".b.log", 10)
        fc.file_cleanup(path=str(tmp_path), max_age="1d", pattern="*.log")
        assert (log.exists(), hidden.exists(), txt.exists()) == (False, False, True)

    def test_not_recursive_by_default(self, fc: types.ModuleType, tmp_path: Path) -> None:
        deep = make(tmp_path / "sub" / "old.log", 10)
        assert fc.file_cleanup(path=str(tmp_path), max_age="1d")["removed"] == 0
        assert deep.exists()

    def test_recursive(self, fc: types.ModuleType, tmp_path: Path) -> None:
        deep = make(tmp_path / "a" / "b" / "old.log", 10)
        fresh = make(tmp_path / "a" / "new.log", 0)
        result = fc.file_cleanup(path=str(tmp_path), max_age="1d", recursive=True)
        assert (deep.exists(), fresh.exists()) == (False, True)
        assert result["removed"] == 1
        assert (tmp_path / "a" / "b").is_dir()  # folders stay unless asked

    def test_sample_is_capped(self, fc: types.ModuleType, tmp_path: Path) -> None:
        for i in range(5):
            make(tmp_path / f"f{i}", 10)
        result = fc.file_cleanup(path=str(tmp_path), max_age="1d", sample_size=2)
        assert result["removed"] == 5
        assert result["sample"] == [str(tmp_path / "f0"), str(tmp_path / "f1")]

    def test_a_symlink_to_the_folder_is_followed(
        self, fc: types.ModuleType, tmp_path: Path
    ) -> None:
        # The configured folder may be a link (/var/log/app -> /data/logs); links inside are not.
        real = tmp_path / "real"
        old = make(real / "old.log", 10)
        (tmp_path / "link").symlink_to(real)
        result = fc.file_cleanup(path=str(tmp_path / "link"), max_age="1d")
        assert not old.exists()
        assert result["path"] == str(real)


class TestSymlinks:
    """Symlinks are never followed, out of the folder or within it, nor removed."""

    def test_link_to_an_outside_folder_is_not_entered(
        self, fc: types.ModuleType, tmp_path: Path
    ) -> None:
        outside = make(tmp_path / "outside" / "precious.log", 100)
        root = tmp_path / "root"
        root.mkdir()
        link = root / "escape"
        link.symlink_to(outside.parent, target_is_directory=True)
        result = fc.file_cleanup(
            path=str(root), max_age="1d", recursive=True, remove_empty_dirs=True
        )
        assert outside.exists()
        assert link.is_symlink()
        assert result["removed"] == 0

    def test_link_to_an_outside_file_is_left_alone(
        self, fc: types.ModuleType, tmp_path: Path
    ) -> None:
        outside = make(tmp_path / "outside" / "precious.log", 100)
        root = tmp_path / "root"
        root.mkdir()
        link = root / "precious.log"
        link.symlink_to(outside)
        old = time.time() - 100 * DAY
        os.utime(link, (old, old), follow_symlinks=False)
        assert fc.file_cleanup(path=str(root), max_age="1d")["removed"] == 0
        assert outside.exists()
        assert link.is_symlink()

    def test_fifo_is_left_alone(self, fc: types.ModuleType, tmp_path: Path) -> None:
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        age_dir(fifo, 10)
        assert fc.file_cleanup(path=str(tmp_path), max_age="1d")["removed"] == 0
        assert fifo.exists()


class TestEmptyFolders:
    """remove_empty_dirs removes subfolders this run emptied, or empty and old; never the root."""

    def test_emptied_folders_go(self, fc: types.ModuleType, tmp_path: Path) -> None:
        make(tmp_path / "a" / "b" / "old.log", 10)
        keep = make(tmp_path / "c" / "new.log", 0)
        result = fc.file_cleanup(
            path=str(tmp_path), max_age="1d", recursive=True, remove_empty_dirs=True
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
        assert keep.exists()
        assert (result["removed"], result["dirs_removed"]) == (1, 2)
        assert result["sample"] == [
            str(tmp_path / "a" / "b" / "old.log"),
            str(tmp_path / "a" / "b") + os.sep,
            str(tmp_path / "a") + os.sep,
        ]

    def test_empty_folders_go_only_when_old(self, fc: types.ModuleType, tmp_path: Path) -> None:
        # A new empty folder may be one an application just made to write into.
        (tmp_path / "new-empty").mkdir()
        (tmp_path / "old-empty").mkdir()
        age_dir(tmp_path / "old-empty", 10)
        fc.file_cleanup(path=str(tmp_path), max_age="1d", recursive=True, remove_empty_dirs=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["new-empty"]

    def test_root_stays_even_when_emptied(self, fc: types.ModuleType, tmp_path: Path) -> None:
        root = tmp_path / "root"
        make(root / "old.log", 10)
        age_dir(root, 10)
        fc.file_cleanup(path=str(root), max_age="1d", recursive=True, remove_empty_dirs=True)
        assert root.is_dir()
        assert list(root.iterdir()) == []

    def test_dry_run_counts_folders_it_would_empty(
        self, fc: types.ModuleType, tmp_path: Path
    ) -> None:
        old = make(tmp_path / "a" / "old.log", 10)
        result = fc.file_cleanup(
            path=str(tmp_path), max_age="1d", recursive=True, remove_empty_dirs=True, dry_run=True
        )
        assert old.exists()
        assert (result["removed"], result["dirs_removed"]) == (1, 1)

    def test_needs_recursive(self, fc: types.ModuleType, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="needs 'recursive = true'"):
            fc.file_cleanup(path=str(tmp_path), max_age="1d", remove_empty_dirs=True)


class TestRefusals:
    """The root folder, a missing path and a file are refused before anything is touched."""

    def test_root_folder(self, fc: types.ModuleType) -> None:
        with pytest.raises(ValueError, match="refusing to clean the root folder"):
            fc.file_cleanup(path="/", max_age="3650d", dry_run=True)

    def test_link_to_the_root_folder(self, fc: types.ModuleType, tmp_path: Path) -> None:
        (tmp_path / "slash").symlink_to("/")
        with pytest.raises(ValueError, match="refusing to clean the root folder"):
            fc.file_cleanup(path=str(tmp_path / "slash"), max_age="3650d", dry_run=True)

    def test_missing(self, fc: types.ModuleType, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"'path' .* does not exist"):
            fc.file_cleanup(path=str(tmp_path / "nope"), max_age="1d")

    def test_not_a_folder(self, fc: types.ModuleType, tmp_path: Path) -> None:
        file = make(tmp_path / "file", 10)
        with pytest.raises(NotADirectoryError, match="is not a folder"):
            fc.file_cleanup(path=str(file), max_age="1d")
        assert file.exists()


class TestErrors:
    """Files that cannot be removed fail the run, after everything else was done."""

    @pytest.mark.skipif(os.geteuid() == 0, reason="root may remove files from any folder")
    def test_unremovable_files_are_named(self, fc: types.ModuleType, tmp_path: Path) -> None:
        locked = tmp_path / "locked"
        stuck = make(locked / "stuck.log", 10)
        gone = make(tmp_path / "gone.log", 10)
        locked.chmod(0o555)
        try:
            with pytest.raises(OSError, match=r"1 path\(s\) .* could not be removed") as info:
                fc.file_cleanup(path=str(tmp_path), max_age="1d", recursive=True)
        finally:
            locked.chmod(0o755)
        assert f"{stuck}: Permission denied" in str(info.value)
        assert "(removed 1 files" in str(info.value)
        assert stuck.exists()
        assert not gone.exists()

    def test_failures_are_collected_not_fatal_midway(
        self, fc: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The same as above where the tests run as root: unlink refuses one name.
        stuck = make(tmp_path / "b-stuck.log", 10)
        before = make(tmp_path / "a.log", 10)
        after = make(tmp_path / "c.log", 10)
        real_unlink = os.unlink

        def unlink(name: str, *, dir_fd: int | None = None) -> None:
            if name == stuck.name:
                raise PermissionError(1, "Operation not permitted")
            real_unlink(name, dir_fd=dir_fd)

        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(OSError, match=r"1 path\(s\) .* could not be removed") as info:
            fc.file_cleanup(path=str(tmp_path), max_age="1d")
        assert f"{stuck}: Operation not permitted" in str(info.value)
        assert "(removed 2 files, 2 bytes)" in str(info.value)
        assert (before.exists(), stuck.exists(), after.exists()) == (False, True, False)
