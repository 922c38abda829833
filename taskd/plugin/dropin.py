"""Load plugin ``.py`` files from drop-in folders by path.

Each file becomes a module named ``_taskd_dropin_<stem>_<hash>``, the hash taken over its path
and content. The name is stable while the file is unchanged, so a reload reuses the module (its
jobs stay unchanged), and a changed file gets a new name, so the old module, still used by
runs in flight, is left alone. Process-pool workers load the same file under the same name
(see taskd.run.worker), which is how ``cpu`` job types from a drop-in file reach them."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PREFIX = "_taskd_dropin_"


@dataclass(frozen=True, slots=True)
class DropinFile:
    path: Path
    module_name: str


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
            digest = hashlib.sha256(str(path.resolve()).encode() + b"\0" + content).hexdigest()[:10]
            stem = re.sub(r"\W", "_", path.stem)
            found.append(DropinFile(path, f"{PREFIX}{stem}_{digest}"))
    return found, problems


def load(file: DropinFile) -> ModuleType:
    """Import a drop-in file under its module name, or return it if already imported.

    Raises whatever the plugin's import raises; the caller records it as a broken plugin."""
    return load_path(file.module_name, str(file.path))


def load_path(module_name: str, path: str) -> ModuleType:
    """The module already imported under ``module_name``, or the file at ``path`` imported so."""
    existing = sys.modules.get(module_name)
    if existing is not None:
        return existing
    return exec_file(module_name, path)


def exec_file(module_name: str, path: str) -> ModuleType:
    """Execute the file at ``path`` as a new module ``module_name`` (the parent's loader and the
    process-pool workers both use this, so a drop-in is the same module on both sides)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module", name=module_name, path=path)
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so pickle (process pool) and dataclasses can find the module.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
