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
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PREFIX = "_taskd_dropin_"
DIGEST_LEN = 10
LOADING = "__taskd_loading__"  # set on a module while its file executes


@dataclass(frozen=True, slots=True)
class DropinFile:
    path: Path
    module_name: str
    source: bytes = b""  # the very bytes the name's hash was taken over


def digest(path: Path, content: bytes) -> str:
    return hashlib.sha256(str(path.resolve()).encode() + b"\0" + content).hexdigest()[:DIGEST_LEN]


def scan(folders: tuple[Path, ...]) -> tuple[list[DropinFile], list[tuple[Path, str]]]:
    """The plugin files in ``folders`` (in folder order, then by name), and per-folder problems.

    A missing folder is a problem to report, not a crash: the daemon runs without it."""
    found: list[DropinFile] = []
    problems: list[tuple[Path, str]] = []
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
        for path in entries:
            if path.name.startswith(("_", ".")):
                continue
            try:
                content = path.read_bytes()
            except OSError as exc:
                problems.append((path, f"cannot read plugin file: {exc}"))
                continue
            stem = re.sub(r"\W", "_", path.stem)
            found.append(DropinFile(path, f"{PREFIX}{stem}_{digest(path, content)}", content))
    return found, problems


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
            source = Path(path).read_bytes()
        except OSError as exc:
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
