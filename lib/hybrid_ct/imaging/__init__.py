"""Reading, writing and checking one CT image: always a 3D float32 SimpleITK image in HU.

The public surface, importable from here (each name loads its module on first use):

- ``reader``: ``read_image``, ``write_image``, ``read_label``
- ``chest``: ``check_ct``
- ``body``: ``body_mask``
- ``filecheck``: ``check_volume_file``
- ``calibration``: ``calibrate_8bit``, ``EXPORT_WINDOW_HU``
"""

from __future__ import annotations

import importlib

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
__all__ = sorted(_HOME)


def __getattr__(name: str):
    """PEP 562: import the module that holds ``name`` only when asked (the CLI stays quick to start)."""
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
