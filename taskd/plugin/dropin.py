"""Load plugin ``.py`` files from drop-in folders by path.

Each file becomes a module named ``_taskd_dropin_<stem>_<hash>``, the hash taken over its path
and content. The name is stable while the file is unchanged, so a reload reuses the module (its
jobs stay unchanged), and a changed file gets a new name, so the old module, still used by
runs in flight, is left alone. Process-pool workers load the same file under the same name
(see taskd.run.worker), which is how ``cpu`` job types from a drop-in file reach them."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import stat
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from taskd.trust import Problem, TrustChecker, Untrusted

PREFIX = "_taskd_dropin_"
DIGEST_LEN = 10
LOADING = "__taskd_loading__"  # set on a module while its file executes
# The largest plugin file read (1 MiB): hand-written plugins are a few KB, and every file is
# read whole into memory by `taskd check`, `taskd run`, each reload and each process worker.
MAX_PLUGIN_BYTES = 1024 * 1024
_READ_CHUNK = 64 * 1024


def is_test_file(name: str) -> bool:
    """A plugin's tests, kept beside it, not a plugin: ``test_*.py``, ``*_test.py`` and
    ``conftest.py`` (pytest's own patterns). They import the plugin by its plain name, which
    only pytest's sys.path makes work, so loading one as a plugin would just break."""
    return name == "conftest.py" or name.startswith("test_") or name.endswith("_test.py")


class PluginFileError(OSError):
    """A file in a plugin folder that is not read: not a regular file, or too big."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"file type {stat.S_IFMT(mode):#o}"


def _refusal(path: Path, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        via = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        return (
            f"not a regular file but {_kind(st.st_mode)}{via}; only regular .py files are loaded: "
            f"remove it, or rename it so that its name does not end in .py"
        )
    if st.st_size > MAX_PLUGIN_BYTES:
        return _too_big(st.st_size)
    return None


def _too_big(size: int | None) -> str:
    what = f"{size} bytes" if size is not None else "still growing"
    return (
        f"plugin file is {what}, over the limit of {MAX_PLUGIN_BYTES} bytes; move the bulk "
        f"into a module it imports, or install it as a package with an entry point"
    )


def read_source(path: Path) -> bytes:
    """The bytes of a plugin file, refusing (PluginFileError) anything but a regular file of at
    most MAX_PLUGIN_BYTES. Never blocks on a FIFO and never reads more than the limit + 1.

    Symlinks are followed: a plugin file linked in from elsewhere is common. This reads by
    path, for a process worker, which checks what it read against the hash in the module's
    name; the daemon reads what it checked (scan, TrustChecker.open)."""
    refusal = _refusal(path, os.stat(path))
    if refusal is not None:
        raise PluginFileError(refusal)
    # The file may be swapped (for a FIFO, a device, a bigger file) between stat and open:
    # O_NONBLOCK so opening a FIFO cannot wait for a writer, O_NOCTTY so a terminal cannot
    # become ours, and the opened file is checked again before a byte is read.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        return _read_open(path, fd)
    finally:
        os.close(fd)


def _read_open(path: Path, fd: int) -> bytes:
    refusal = _refusal(path, os.fstat(fd))
    if refusal is not None:
        raise PluginFileError(refusal)
    chunks: list[bytes] = []
    left = MAX_PLUGIN_BYTES + 1  # one byte past the limit tells a file that grew
    while left > 0:
        chunk = os.read(fd, min(left, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    if left <= 0:
        raise PluginFileError(_too_big(None))
    return b"".join(chunks)


def _read_checked(trust: TrustChecker, path: Path, folder: tuple[Problem, ...]) -> bytes:
    """The bytes of the plugin file ``path`` as judged by ``trust``: refused (Untrusted) when
    it, its folder (``folder``: what is wrong with it) or anything on its path is not
    trusted, and read from the very file that was judged (TrustChecker.open), never from one
    swapped in after the check."""
    verdict = trust.judge(path, "plugin file")
    # Every reason at once, the folder's and the file's own, so one round of fixes does.
    seen = {p.path for p in folder}
    problems = (*folder, *(p for p in verdict.problems if not p.path or p.path not in seen))
    if folder:
        raise Untrusted(problems)
    # Not a regular file (a FIFO, a link to a device): said as such, and never opened.
    refusal = _refusal(path, verdict.st)
    if refusal is not None:
        raise PluginFileError(refusal)
    if problems:
        raise Untrusted(problems)
    fd = trust.open(verdict)
    try:
        return _read_open(path, fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class DropinFile:
    path: Path
    module_name: str
    source: bytes = b""  # the very bytes the name's hash was taken over
    # Why the file is not loaded though it is a plugin file (taskd.trust: others could change
    # it); the loader records it as a broken plugin, so the jobs that need it show the reason.
    refused: str | None = None


def digest(path: Path, content: bytes) -> str:
    return hashlib.sha256(str(path.resolve()).encode() + b"\0" + content).hexdigest()[:DIGEST_LEN]


def scan(folders: tuple[Path, ...]) -> tuple[list[DropinFile], list[tuple[Path, str]]]:
    """The plugin files in ``folders`` (in folder order, then by name), and per-folder problems.

    Skipped: names starting with ``_`` or ``.``, and test files (:func:`is_test_file`).

    A missing folder is a problem to report, not a crash: the daemon runs without it. So is a
    ``.py`` entry that is not a regular file of at most MAX_PLUGIN_BYTES (see read_source).

    A folder or file that others could change (taskd.trust: owned by another non-root user,
    writable by group or others, or so is a folder or link on its path as given or on its
    target's) is not read: each such file comes back with ``refused`` set (every reason,
    the folder's and its own), and a refused folder is also a problem, so that one with no
    ``.py`` file yet is reported too. A file that is read is the file that was checked."""
    found: list[DropinFile] = []
    problems: list[tuple[Path, str]] = []
    trust = TrustChecker()
    for folder in folders:
        if not folder.exists():
            problems.append((folder, "plugin folder does not exist"))
            continue
        if not folder.is_dir():
            problems.append((folder, "plugin_dirs entry is not a folder"))
            continue
        try:
            entries = sorted(folder.glob("*.py"))
        except OSError as exc:
            problems.append((folder, f"cannot list plugin folder: {exc}"))
            continue
        try:
            folder_problems = trust.judge(folder, "plugin folder", folder=True).problems
        except OSError as exc:
            folder_problems = (
                Problem(f"cannot check plugin folder {folder}: {exc.strerror or exc}"),
            )
        if folder_problems:
            problems.append((folder, "; ".join(p.message for p in folder_problems)))
        for path in entries:
            if path.name.startswith(("_", ".")) or is_test_file(path.name):
                continue
            stem = re.sub(r"\W", "_", path.stem)
            try:
                content = _read_checked(trust, path, folder_problems)
            except Untrusted as exc:
                found.append(DropinFile(path, f"{PREFIX}{stem}_refused", refused=str(exc)))
                continue
            except PluginFileError as exc:
                # Reported, and the rest of the folder loads: one odd file must not stop it.
                problems.append((path, str(exc)))
                continue
            except OSError as exc:
                problems.append((path, f"cannot read plugin file: {exc.strerror or exc}"))
                continue
            found.append(DropinFile(path, f"{PREFIX}{stem}_{digest(path, content)}", content))
    return found, problems


def entry(path: Path) -> DropinFile:
    """One plugin file named directly (taskd.testing), under the module name the daemon would
    give it. Not checked for trust (taskd.trust): a test loads the author's own working copy,
    which ``taskd check`` judges where it is deployed. Raises OSError if it cannot be read."""
    content = read_source(path)
    stem = re.sub(r"\W", "_", path.stem)
    return DropinFile(path, f"{PREFIX}{stem}_{digest(path, content)}", content)


def load(file: DropinFile) -> ModuleType:
    """Import a drop-in file under its module name, or return it if already imported.

    Raises whatever the plugin's import raises; the caller records it as a broken plugin."""
    existing = sys.modules.get(file.module_name)
    if existing is not None:
        if getattr(existing, LOADING, False):
            # An earlier reload timed out while this file's import hung; it is still going.
            raise ImportError(
                f"{file.path} is still being imported by an earlier reload (does its import hang?)",
                name=file.module_name,
                path=str(file.path),
            )
        return existing
    return exec_file(file.module_name, str(file.path), file.source)


def exec_file(module_name: str, path: str, source: bytes | None = None) -> ModuleType:
    """Execute a plugin file as a new module ``module_name`` (the parent's loader and the
    process-pool workers both use this, so a drop-in is the same module on both sides).

    Compiled from the bytes themselves, never from a cached .pyc, so the code that runs is
    the code that was hashed. A worker passes no ``source`` and reads the file: if it no
    longer matches the hash in the module name, the run fails rather than running code the
    daemon never loaded (or validated options against)."""
    if source is None:
        try:
            source = read_source(Path(path))
        except OSError as exc:  # PluginFileError too
            raise ImportError(
                f"cannot read plugin file {path}: {exc}", name=module_name, path=path
            ) from exc
        expected = module_name.rsplit("_", 1)[-1] if module_name.startswith(PREFIX) else None
        if expected is not None and digest(Path(path), source) != expected:
            raise ImportError(
                f"plugin file {path} changed on disk since the daemon loaded it; reload taskd "
                f"(systemctl reload taskd, or SIGHUP) to run the new code",
                name=module_name,
                path=path,
            )
    code = compile(source, path, "exec", dont_inherit=True)
    module = types.ModuleType(module_name)
    # A real loader, for what plugins may ask of it (importlib.resources, pkgutil.get_data);
    # the code itself is executed here, from the bytes above.
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    module.__file__ = path
    module.__loader__ = loader
    module.__spec__ = importlib.machinery.ModuleSpec(module_name, loader, origin=path)
    setattr(module, LOADING, True)
    # Registered before exec so pickle (process pool) and dataclasses can find the module.
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        delattr(module, LOADING)
    return module
