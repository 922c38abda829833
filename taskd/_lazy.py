"""Package attributes imported on first use (PEP 562), for packages whose own import must
stay cheap: `taskd` (imported by every command before its signal handlers are in place) and
`taskd.config` (whose validation loads while the config file parses)."""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing costs 2 ms (see taskd/__init__.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def lazy(
    package: str, homes: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: each name in ``homes`` is
    imported from the module it maps to when first looked up, then kept in ``namespace``
    (the package's globals), so later lookups find it directly, without this call."""

    def __getattr__(name: str) -> Any:
        module = homes.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *homes})

    return __getattr__, __dir__
