"""A small phantom-like chest CT built with numpy (for the module self-test and the pytest tests).

Not a substitute for ``hybrid_ct.data.phantom`` (the data worker's realistic phantom); this one only has
to be recognisably chest-like and carry an exact label map: air outside, a soft-tissue body, two
lungs at about -850 HU and ground-glass infection blobs at about -350 HU inside the right lung.
"""

from __future__ import annotations

import numpy as np

from .imageio import Geometry
from .segments import server_label_names


def make_chest_volume(shape: tuple[int, int, int] = (24, 64, 64), spacing=(1.2, 1.2, 5.0), seed: int = 0,
                      infected: bool = True, sides: bool = True) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Return ``(ct int16 [k,j,i] in HU, label uint8, LPS geometry)``: the label as the server returns it
    (right lung, left lung, infection), or with ``sides=False`` as before the sides (lung 1, infection 2)."""
    nz, ny, nx = shape
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    ct = np.full(shape, -1000.0)
    body = (x / 0.92) ** 2 + (y / 0.7) ** 2 <= 1.0
    ct[body] = 40.0
    taper = 1.0 - 0.35 * z ** 2  # lungs narrow towards apex and base
    # Patient's right is at -x in LPS-index space with identity direction (i grows towards the left).
    right = ((x + 0.42) / (0.33 * taper)) ** 2 + (y / (0.5 * taper)) ** 2 + (z / 0.95) ** 2 <= 1.0
    left = ((x - 0.42) / (0.31 * taper)) ** 2 + (y / (0.48 * taper)) ** 2 + (z / 0.95) ** 2 <= 1.0
    lung = (right | left) & body
    ct[lung] = -850.0
    label = np.zeros(shape, np.uint8)
    values = server_label_names()
    label[lung] = values["lung"]
    if sides:
        label[right & lung] = values["right_lung"]
        label[left & lung] = values["left_lung"]
    if infected:
        centres = [(-0.45, 0.15, 0.2), (-0.35, -0.2, -0.3), (0.45, 0.25, 0.4)]
        for cx, cy, cz in centres:
            blob = ((x - cx) / 0.12) ** 2 + ((y - cy) / 0.12) ** 2 + ((z - cz) / 0.35) ** 2 <= 1.0
            blob &= lung
            ct[blob] = -350.0
            label[blob] = values["infection"]
    ct += rng.normal(0.0, 15.0, shape)
    geometry = Geometry(spacing=spacing, origin=(-nx * spacing[0] / 2, -ny * spacing[1] / 2, -nz * spacing[2] / 2))
    return np.clip(np.round(ct), -1024, 3071).astype(np.int16), label, geometry
