"""Config: TOML file -> validated frozen objects.

The names below are imported when first used (PEP 562), not with the package: ``taskd run``
starts the config parser's process (taskd.config.source) before it imports the validation
(load.py and all it needs, about 25 ms), which then runs while the file parses."""

from __future__ import annotations

from taskd._lazy import lazy

TYPE_CHECKING = False  # not typing's: see taskd/__init__.py
if TYPE_CHECKING:
    from taskd.config.checks import suggest
    from taskd.config.load import load_config
    from taskd.config.model import Config, DaemonConfig, JobConfig
    from taskd.config.source import DEFAULT_CONFIG, read_toml

__all__ = [
    "DEFAULT_CONFIG",
    "Config",
    "DaemonConfig",
    "JobConfig",
    "load_config",
    "read_toml",
    "suggest",
]

_HOME = {
    "DEFAULT_CONFIG": "taskd.config.source",
    "Config": "taskd.config.model",
    "DaemonConfig": "taskd.config.model",
    "JobConfig": "taskd.config.model",
    "load_config": "taskd.config.load",
    "read_toml": "taskd.config.source",
    "suggest": "taskd.config.checks",
}


# Hidden from type checkers, which see the names through the imports above.
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy(__name__, _HOME, globals())
