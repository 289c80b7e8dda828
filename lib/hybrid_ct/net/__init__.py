"""The network: the hybrid spike-conv multi-task model and its CNN twin, its losses, its energy meter and its checkpoints.

The public surface, importable from here (each name loads its module on first use):

- ``network``: ``NetConfig``, ``HybridMultiTaskNet``, ``cnn_twin``, ``from_twin``, ``build_model``
- ``losses``: ``MultiTaskLoss``
- ``energy``: ``EnergyMeter``, ``EnergyReport``
- ``checkpoint``: ``save_checkpoint``, ``load_checkpoint``
- ``model_files``: ``default_model_path``, ``PACKAGED_MODEL``
"""

from hybrid_ct.lazy import lazy_surface

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
__getattr__, __all__ = lazy_surface(__name__, _HOME)
