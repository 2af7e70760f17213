"""Names a package re-exports from its modules, imported on first use (PEP 562), so that importing the package (and
the CLI's `--help`, which reads only torch-free modules) does not load torch."""
from __future__ import annotations


def lazy_exports(package: str, namespace: dict, table: dict[str, str]):
    """The package's `__getattr__`: `name` is `table[name]`'s module's attribute of that name, imported once."""

    def __getattr__(name: str):
        if name in table:
            import importlib

            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
