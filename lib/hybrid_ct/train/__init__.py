"""Training: recipes, the one loop (``Trainer``), the twin -> spiking build, and the torchrun entry point (``python -m hybrid_ct.train``).

The public surface, importable from here (each name loads its module on first use):

- ``config``: ``TrainConfig``
- ``trainer``: ``Trainer``, ``fit``
- ``recipes``: ``resolve_recipe``, ``load_recipe``, ``recipe_names``
- ``build``: ``train_recipe``
- ``scoring``: ``evaluate``, ``validation_score``
- ``metrics``: ``SegmentationMeter``, ``classification_metrics``, ``dice``
"""

from hybrid_ct.lazy import lazy_surface

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
__getattr__, __all__ = lazy_surface(__name__, _HOME)
