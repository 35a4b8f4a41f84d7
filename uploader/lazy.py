"""Names a package exports but imports only when first used (PEP 562), so that importing the
package (or any module in it) stays cheap: the CLI's ``--help``, a worker's modules."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, namespace: dict[str, Any], homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each of ``homes``' names (name ->
    the module it lives in) at its first use and keeps it in ``namespace`` (the package's
    ``globals()``), so it is looked up once."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    return __getattr__
