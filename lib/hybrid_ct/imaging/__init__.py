"""Reading, writing and checking one CT image: always a 3D float32 SimpleITK image in HU.

The public surface, importable from here (each name loads its module on first use):

- ``reader``: ``read_image``, ``write_image``, ``read_label``
- ``chest``: ``check_ct``
- ``body``: ``body_mask``
- ``filecheck``: ``check_volume_file``
- ``calibration``: ``calibrate_8bit``, ``EXPORT_WINDOW_HU``
"""

from hybrid_ct.lazy import lazy_surface

_HOME = {
    "read_image": "reader",
    "write_image": "reader",
    "read_label": "reader",
    "check_ct": "chest",
    "body_mask": "body",
    "check_volume_file": "filecheck",
    "calibrate_8bit": "calibration",
    "EXPORT_WINDOW_HU": "calibration",
}
__getattr__, __all__ = lazy_surface(__name__, _HOME)
