"""The executors' config tables: ``[dask]`` (the bundled dask executor's) and
``[executors.<name>]`` (a plugin executor's). Only their shape is checked here; their keys
are each executor's own, checked once plugins are loaded (taskd.plugin.executors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from taskd.config.checks import _Collector, type_name

# Top-level keys these tables take (config/load.py adds them to the known ones).
EXECUTOR_TOP_KEYS = ("dask", "executors")


def executor_tables(c: _Collector, data: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Table name ("dask", "executors.<name>") -> its table, for the ones that are tables."""
    tables: dict[str, Mapping[str, Any]] = {}
    if "dask" in data:
        dask = data["dask"]
        if isinstance(dask, dict):
            tables["dask"] = dask
        else:
            c.add("dask", f"expected a table [dask], got {type_name(dask)}")
    if "executors" in data:
        group = data["executors"]
        if not isinstance(group, dict):
            c.add("executors", f"expected tables [executors.<name>], got {type_name(group)}")
            return tables
        for name, table in group.items():
            if isinstance(table, dict):
                tables[f"executors.{name}"] = table
            else:
                c.add(
                    f"executors.{name}",
                    f"expected a table [executors.{name}], got {type_name(table)}",
                )
    return tables
