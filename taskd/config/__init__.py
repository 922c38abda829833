"""Config: TOML file -> validated frozen objects."""

from taskd.config.checks import suggest
from taskd.config.load import DEFAULT_CONFIG, load_config
from taskd.config.model import Config, DaemonConfig, JobConfig
from taskd.config.source import read_toml

__all__ = [
    "DEFAULT_CONFIG",
    "Config",
    "DaemonConfig",
    "JobConfig",
    "load_config",
    "read_toml",
    "suggest",
]
