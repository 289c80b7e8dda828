"""Evaluation of built models: validation metrics, pictures, the whole-scan check, seeds, side-by-side comparisons and the documents they render.

The public surface, importable from here (each name loads its module on first use):

- ``validation``: ``evaluate_checkpoints``, ``evaluate_sets``
- ``results_doc``: ``write_results``, ``update_model_card``
- ``scan_check``: ``run_scan_check``
- ``seeds``: ``gate``, ``median_seed``
- ``compare``: ``table``
- ``pictures``: ``loso_results``
"""

from __future__ import annotations

import importlib

_HOME = {
    "evaluate_checkpoints": "validation",
    "evaluate_sets": "validation",
    "write_results": "results_doc",
    "update_model_card": "results_doc",
    "run_scan_check": "scan_check",
    "gate": "seeds",
    "median_seed": "seeds",
    "table": "compare",
    "loso_results": "pictures",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    """PEP 562: import the module that holds ``name`` only when asked (the CLI stays quick to start)."""
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
