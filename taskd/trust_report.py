"""Every trust problem of a config at once (taskd.trust), for ``taskd check`` and a refused
start: the config file and the folders on its path, the plugin folders and their files, the
state_dir. A checkout made under umask 002 has a dozen of them; naming one per attempt would
take as many rounds. Where several share a fix under one folder, one command is offered for
all of them (``chmod -R go-w DIR``).

Only file metadata is looked at: nothing is imported, created or changed, and a refused
config's settings are only used to find the paths it names."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from taskd.config.load import daemon_settings
from taskd.config.model import DaemonConfig
from taskd.state.files import audit_problems
from taskd.trust import Problem, TrustChecker

__all__ = ["combined_hints", "survey"]

# Fixes that may be given -R: a chown -h names one link, and is left as it is.
_RECURSIVE = {"chmod go-w": "chmod -R go-w"}


def survey(config_path: Path, daemon: DaemonConfig | None = None) -> list[Problem]:
    """What taskd would refuse for the config at ``config_path`` (``daemon``: its [daemon]
    settings, read from the file when None), each problem once, in the order config file,
    plugin folders and files, state_dir."""
    trust = TrustChecker()
    found: list[Problem] = []
    with contextlib.suppress(OSError):  # missing or unreadable: the config error says so
        found.extend(trust.judge(config_path, "config file").problems)
    if daemon is None:
        daemon = daemon_settings(config_path)
    if daemon is not None:
        for folder in daemon.plugin_dirs:
            found.extend(_plugin_problems(trust, folder))
        found.extend(audit_problems(daemon.state_dir))
    return _unique(found)


def _plugin_problems(trust: TrustChecker, folder: Path) -> list[Problem]:
    # The files taskd.plugin.dropin.scan would read; the folder's own problem comes first.
    try:
        found = list(trust.judge(folder, "plugin folder", folder=True).problems)
        entries = sorted(folder.glob("*.py"))
    except OSError:  # missing or unreadable: the plugin report says so
        return []
    for path in entries:
        if path.name.startswith(("_", ".")):
            continue
        try:
            verdict = trust.judge(path, "plugin file")
        except OSError:
            continue
        if stat.S_ISREG(verdict.st.st_mode):
            found.extend(verdict.problems)
    return found


def _unique(problems: Iterable[Problem]) -> list[Problem]:
    """Each offending path once: a folder above the config and the plugins is one problem."""
    seen: set[str] = set()
    out: list[Problem] = []
    for p in problems:
        if p.path and p.path in seen:
            continue
        seen.add(p.path)
        out.append(p)
    return out


def combined_hints(problems: Iterable[Problem]) -> list[str]:
    """One command for several problems with the same fix under one folder, e.g. "chmod -R
    go-w /home/me/taskd fixes 9 of these at once". Offered only for a folder that is no
    one else's business: one of the problems itself, or owned by the user who owns them all
    (never ``/``, nor a shared sticky folder such as /tmp)."""
    by_fix: dict[str, dict[str, int]] = {}
    problems = list(problems)
    for p in problems:
        for fix in p.fixes:
            if p.path and fix in _RECURSIVE:
                by_fix.setdefault(fix, {})[p.path] = p.owner
    hints = []
    for fix, paths in by_fix.items():
        if len(paths) < 2:
            continue
        top = os.path.commonpath(list(paths))
        if _fit_for_recursion(top, paths):
            every = "all " if len(paths) == len(problems) else ""
            hints.append(f"{_RECURSIVE[fix]} {top} fixes {every}{len(paths)} of these at once")
    return hints


def _fit_for_recursion(top: str, paths: dict[str, int]) -> bool:
    if top == "/" or (top not in paths and len(set(paths.values())) != 1):
        return False
    try:
        st = os.lstat(top)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_ISVTX:
        return False
    return top in paths or st.st_uid == next(iter(paths.values()))
