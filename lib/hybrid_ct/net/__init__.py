"""The network: the hybrid spike-conv multi-task model and its CNN twin, its losses, its energy meter and its checkpoints.

The public surface, importable from here (each name loads its module on first use):

- ``network``: ``NetConfig``, ``HybridMultiTaskNet``, ``cnn_twin``, ``from_twin``, ``build_model``
- ``losses``: ``MultiTaskLoss``
- ``energy``: ``EnergyMeter``, ``EnergyReport``
- ``checkpoint``: ``save_checkpoint``, ``load_checkpoint``
- ``model_files``: ``default_model_path``, ``PACKAGED_MODEL``
"""

from __future__ import annotations

import importlib

_HOME = {
    "NetConfig": "network",
    "HybridMultiTaskNet": "network",
    "cnn_twin": "network",
    "from_twin": "network",
    "build_model": "network",
    "MultiTaskLoss": "losses",
    "EnergyMeter": "energy",
    "EnergyReport": "energy",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "default_model_path": "model_files",
    "PACKAGED_MODEL": "model_files",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    """PEP 562: import the module that holds ``name`` only when asked (the CLI stays quick to start)."""
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
