"""Bundled taskd plugin: ``file_cleanup``, remove files older than an age under a folder.

A drop-in file: the daemon loads it by path. The job is ``kind="blocking"``: walking and
unlinking are plain system calls, run in the thread pool.

The walk works on directory file descriptors (``os.scandir(fd)``, ``O_NOFOLLOW``, ``dir_fd=``),
like ``shutil.rmtree``'s safe variant: a subfolder swapped for a symlink between listing and
opening is refused by the kernel instead of followed, so a cleanup of a folder others can write
to (a tmp or upload folder) can never be steered into removing files outside it.
"""

import errno
import math
import os
import re
import stat
import time
from fnmatch import fnmatchcase
from typing import Any

import taskd

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER = r"\d+(?:\.\d+)?"
_PART = re.compile(rf"({_NUMBER})([smhdw])")


def parse_age(value: str | int | float) -> float:
    """Seconds in ``value``: a number of seconds, or a string such as "90", "30m", "12h",
    "7d", "2w" or "1h30m". Must be more than zero.

    A tiny parser of its own, so this drop-in file depends on taskd's public API only.
    """
    # bool is an int, and TOML `true` would otherwise mean one second.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(
            f"file_cleanup: option 'max_age' must be a number or a string, got {value!r}"
        )
    if isinstance(value, str):
        text = value.replace(" ", "")
        if re.fullmatch(_NUMBER, text):
            seconds = float(text)
        elif re.fullmatch(rf"(?:{_NUMBER}[smhdw])+", text):
            seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
        else:
            raise ValueError(
                f"file_cleanup: option 'max_age' {value!r} is not a duration; write seconds "
                f'or a number with a unit s, m, h, d or w, such as "7d" or "1h30m"'
            )
    else:
        seconds = float(value)
    # Zero would remove every matching file however new, most likely by mistake.
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"file_cleanup: option 'max_age' must be more than zero, got {value!r}")
    return seconds


class _Cleanup:
    """One pass over a folder; counts what it removed (or would have, when a dry run)."""

    def __init__(
        self,
        *,
        cutoff: float,
        pattern: str,
        recursive: bool,
        dry_run: bool,
        remove_empty_dirs: bool,
        sample_size: int,
    ) -> None:
        self.cutoff = cutoff
        self.pattern = pattern
        self.recursive = recursive
        self.dry_run = dry_run
        self.remove_empty_dirs = remove_empty_dirs
        self.sample_size = sample_size
        self.removed = 0
        self.bytes = 0
        self.dirs_removed = 0
        self.sample: list[str] = []
        self.errors: list[str] = []

    def _note(self, shown: str) -> None:
        if len(self.sample) < self.sample_size:
            self.sample.append(shown)

    def folder(self, fd: int, shown: str) -> tuple[bool, bool]:
        """Clean the open folder ``fd``: (whether it is now empty, whether this pass removed
        anything from it). In a dry run, "removed" means "would have removed"."""
        remaining = 0
        removed_any = False
        with os.scandir(fd) as it:
            # Sorted, so the sample and error lists come out the same on every run.
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            path = os.path.join(shown, entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
            if stat.S_ISDIR(st.st_mode) and self.recursive:
                gone = self._subfolder(fd, entry.name, path, st)
            elif (
                stat.S_ISREG(st.st_mode)
                and st.st_mtime < self.cutoff
                and fnmatchcase(entry.name, self.pattern)
            ):
                gone = self._file(fd, entry.name, path, st)
            else:
                # Symlinks (to files or folders, in or out of the folder), sockets, FIFOs and
                # devices are never touched.
                gone = False
            if gone:
                removed_any = True
            else:
                remaining += 1
        return remaining == 0, removed_any

    def _file(self, fd: int, name: str, path: str, st: os.stat_result) -> bool:
        if not self.dry_run:
            try:
                # Relative to the folder's fd: if the name now is a symlink, the link itself
                # is removed, never its target.
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                return True
            except OSError as exc:
                self.errors.append(f"{path}: {exc.strerror}")
                return False
        self.removed += 1
        self.bytes += st.st_size
        self._note(path)
        return True

    def _subfolder(self, fd: int, name: str, path: str, st: os.stat_result) -> bool:
        try:
            # O_NOFOLLOW: fails (ELOOP) if the folder was swapped for a symlink since the stat.
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            return True
        except OSError as exc:
            self.errors.append(f"{path}: {exc.strerror}")
            return False
        try:
            opened = os.fstat(sub)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                # Replaced by another folder between the stat and the open: not what was
                # listed, so leave it alone this time.
                return False
            empty, removed_any = self.folder(sub, path)
        finally:
            os.close(sub)
        # A folder that is empty but new may be one an application just made to write into;
        # it goes only when old itself or emptied by this pass.
        if not (self.remove_empty_dirs and empty and (removed_any or st.st_mtime < self.cutoff)):
            return False
        if not self.dry_run:
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:  # something was written into it meanwhile
                    self.errors.append(f"{path}: {exc.strerror}")
                return False
        self.dirs_removed += 1
        self._note(path + os.sep)
        return True


def file_cleanup(
    path: str,
    max_age: str | int | float,
    pattern: str = "*",
    recursive: bool = False,
    dry_run: bool = False,
    remove_empty_dirs: bool = False,
    sample_size: int = 20,
) -> dict[str, Any]:
    """Remove files older than max_age under a folder; symlinks are never followed.

    Options:
      path: the folder (a symlink to a folder is fine); "/" and non-folders are refused.
      max_age: remove files whose modification time is older than this: seconds, or a string
        such as "30m", "12h", "7d", "1h30m" (required).
      pattern: a glob matched against file names (default "*", hidden files included).
      recursive: descend into subfolders, never through symlinks (default false).
      dry_run: remove nothing; report what would go (default false).
      remove_empty_dirs: also remove subfolders left empty, or empty and older than max_age
        (default false; needs recursive). The folder itself is kept.
      sample_size: how many removed paths to list in the result (default 20).

    Returns removed (file count), bytes, dirs_removed, dry_run, sample (paths), path, max_age.
    Fails, after doing all it can, if some files could not be removed.
    """
    age = parse_age(max_age)
    if remove_empty_dirs and not recursive:
        raise ValueError(
            "file_cleanup: option 'remove_empty_dirs' needs 'recursive = true' "
            "(subfolders are not entered otherwise)"
        )
    if sample_size < 0:
        raise ValueError(f"file_cleanup: option 'sample_size' must be >= 0, got {sample_size}")
    # Resolved first, so a symlink to "/" is refused as well as "/" itself.
    root = os.path.realpath(path)
    if root == os.path.realpath(os.sep):
        raise ValueError(
            f"file_cleanup: refusing to clean the root folder (option 'path' {path!r})"
        )
    if not os.path.exists(root):
        raise FileNotFoundError(f"file_cleanup: option 'path' {path!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"file_cleanup: option 'path' {path!r} is not a folder")

    cleanup = _Cleanup(
        cutoff=time.time() - age,
        pattern=pattern,
        recursive=recursive,
        dry_run=dry_run,
        remove_empty_dirs=remove_empty_dirs,
        sample_size=sample_size,
    )
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cleanup.folder(fd, root)
    finally:
        os.close(fd)

    if cleanup.errors:
        shown = "; ".join(cleanup.errors[:20])
        more = f" ... and {len(cleanup.errors) - 20} more" if len(cleanup.errors) > 20 else ""
        raise OSError(
            f"file_cleanup: {len(cleanup.errors)} path(s) under {root} could not be removed "
            f"(removed {cleanup.removed} files, {cleanup.bytes} bytes): {shown}{more}"
        )
    return {
        "removed": cleanup.removed,
        "bytes": cleanup.bytes,
        "dirs_removed": cleanup.dirs_removed,
        "dry_run": dry_run,
        "sample": cleanup.sample,
        "path": root,
        "max_age": age,
    }


@taskd.hookimpl
def taskd_job_types() -> list[taskd.JobType]:
    return [taskd.JobType("file_cleanup", file_cleanup, kind="blocking")]
