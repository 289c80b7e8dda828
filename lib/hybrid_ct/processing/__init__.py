"""The one pre/post-processing chain between an HU image and the network's slices (MONAI transforms), and the rules on its output: lung components, 3D anatomy, burden, the scan call.

The public surface, importable from here (each name loads its module on first use):

- ``transforms``: ``pre_transforms``, ``post_transforms``, ``model_slices``, ``to_model_slices``, ``label_to_model_slices``, ``run``
- ``grid``: ``window``, ``array_to_image``, ``WINDOW_HU``
- ``postprocess``: ``mask_label``, ``keep_lung_components``
- ``anatomy``: ``plausible_lungs``
- ``sides``: ``lung_sides`` (the derived head: right / left lung, geometric)
- ``burden``: ``infection_burden``, ``severity_grade``
- ``scan_call``: ``Calibration``, ``decide``, ``combine``, ``scan_features``, ``slice_call``, ``load_calibration``
- ``density``: ``lung_density``
- ``context``: ``with_context``
"""

from hybrid_ct.lazy import lazy_surface

_HOME = {
    "pre_transforms": "transforms",
    "post_transforms": "transforms",
    "model_slices": "transforms",
    "to_model_slices": "transforms",
    "label_to_model_slices": "transforms",
    "run": "transforms",
    "window": "grid",
    "array_to_image": "grid",
    "WINDOW_HU": "grid",
    "mask_label": "postprocess",
    "keep_lung_components": "postprocess",
    "plausible_lungs": "anatomy",
    "lung_sides": "sides",
    "infection_burden": "burden",
    "severity_grade": "burden",
    "Calibration": "scan_call",
    "decide": "scan_call",
    "scan_features": "scan_call",
    "slice_call": "scan_call",
    "load_calibration": "scan_call",
    "combine": "scan_call",
    "lung_density": "density",
    "with_context": "context",
}
__getattr__, __all__ = lazy_surface(__name__, _HOME)
