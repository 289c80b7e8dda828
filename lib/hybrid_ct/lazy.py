"""A room's public surface, loaded on first use (PEP 562): ``import hybrid_ct.predict`` costs nothing until a
name is asked for, so the command line starts without importing every room."""
from __future__ import annotations

import importlib


def lazy_surface(package: str, home: dict):
    """``home``: public name -> module of ``package`` that defines it. -> (``__getattr__``, ``__all__``)."""

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(home)
