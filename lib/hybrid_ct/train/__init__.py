"""Training: recipes, the one loop (``Trainer``), the twin -> spiking build, and the torchrun entry point (``python -m hybrid_ct.train``).

The public surface, importable from here (each name loads its module on first use):

- ``config``: ``TrainConfig``
- ``trainer``: ``Trainer``, ``fit``
- ``recipes``: ``resolve_recipe``, ``load_recipe``, ``recipe_names``
- ``build``: ``train_recipe``
- ``scoring``: ``evaluate``, ``validation_score``
- ``metrics``: ``SegmentationMeter``, ``classification_metrics``, ``dice``
"""

from __future__ import annotations

import importlib

_HOME = {
    "TrainConfig": "config",
    "Trainer": "trainer",
    "fit": "trainer",
    "resolve_recipe": "recipes",
    "load_recipe": "recipes",
    "recipe_names": "recipes",
    "train_recipe": "build",
    "evaluate": "scoring",
    "validation_score": "scoring",
    "SegmentationMeter": "metrics",
    "classification_metrics": "metrics",
    "dice": "metrics",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    """PEP 562: import the module that holds ``name`` only when asked (the CLI stays quick to start)."""
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
