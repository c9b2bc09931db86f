"""Lazy public names for a package: `import vitally_jax.data` stays cheap until a name is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_names(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """Module-level `__getattr__` and `__dir__` for `package` that import `names[name]` (a module) on first use.

    In the package's `__init__.py`: `__getattr__, __dir__ = lazy_names(__name__, _LAZY)`; `__all__ = sorted(_LAZY)`.
    """

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(names))

    return __getattr__, __dir__
