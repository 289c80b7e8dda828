"""8-bit pictures -> Hounsfield units: the fixed export window, or a calibration on the picture's own anatomy."""

from __future__ import annotations

import numpy as np

from hybrid_ct.imaging.body import largest_filled, otsu_threshold

EXPORT_WINDOW_HU = (-1350.0, 150.0)
"""The lung window (W1500 / L-600) that 8-bit pictures are assumed exported with: grey 0 is -1350 HU,
255 is 150 HU. It describes the pictures, not the network: the network's own input window is
``NetConfig.window_hu`` (stored in each checkpoint)."""


# Anatomical reference levels of a chest slice in HU, measured by ``anatomy_levels`` on the real HU
# slices in ../shared/data (imlab volumes, Ma Jun coronacases, LIDC; medians; tests/test_io.py
# re-measures them): aerated lung parenchyma and the body's soft tissue (fat, muscle, blood).
HU_LUNG, HU_TISSUE = -870.0, -15.0


def lung_window_hu(g: np.ndarray) -> np.ndarray:
    """0..255 grey levels of a picture exported with the lung window -> HU (``EXPORT_WINDOW_HU``)."""
    lo, hi = EXPORT_WINDOW_HU
    return np.asarray(g, np.float32) * ((hi - lo) / 255.0) + lo


def anatomy_levels(a2d: np.ndarray):
    """-> (lung level, soft-tissue level) of one axial chest slice in its own intensity scale, or None.

    Otsu (on the pixels strictly between the slice's minimum and maximum: no padding, no saturated
    pixels) splits dark (air) from bright (tissue); the body is the largest bright region; the lungs are
    the dark pixels it encloses. Levels are medians. HU slices are clipped to the lung window first.
    A crop whose lungs touch the border falls back to the medians of the two Otsu classes; None when
    even those are degenerate (an almost uniform picture)."""
    a = np.asarray(a2d, np.float32)
    if a.min() < -200:  # Hounsfield units
        a = np.clip(a, *EXPORT_WINDOW_HU)
    inner = a[(a > a.min()) & (a < a.max())]  # without padding and saturated pixels
    if inner.size < 0.05 * a.size:
        return None
    t = otsu_threshold(inner)
    body, filled = (m[0] for m in largest_filled((a > t)[None]))
    if not body.any():
        return None
    lung = filled & ~body
    if lung.sum() >= 0.02 * a.size and body.sum() >= 0.05 * a.size:
        return float(np.median(a[lung])), float(np.median(a[body]))
    # a crop whose lungs touch the border: the two Otsu classes of the inner pixels
    dark, light = inner[inner <= t], inner[inner > t]
    if min(dark.size, light.size) < 0.05 * inner.size:
        return None
    return float(np.median(dark)), float(np.median(light))


def _volume_levels(g3: np.ndarray):
    """Anatomy levels of an 8-bit volume: medians over up to 9 slices spread over its middle 60 %
    (apex and base show little lung), None when fewer than 3 of them give levels."""
    d = len(g3)
    zs = np.unique(np.linspace(0.2 * (d - 1), 0.8 * (d - 1), 9).round().astype(int))
    found = [lv for lv in (anatomy_levels(g3[z]) for z in zs) if lv is not None]
    if len(found) < min(3, len(zs)):
        return None
    return tuple(float(v) for v in np.median(np.array(found), axis=0))


def calibrate_8bit(g: np.ndarray) -> np.ndarray:
    """An 8-bit picture of a chest slice (2D), or an 8-bit volume [z, y, x], -> HU, by mapping its
    lung and soft-tissue levels (``anatomy_levels``; a volume: one map for all its slices, from
    ``_volume_levels``) linearly onto ``HU_LUNG`` / ``HU_TISSUE``; the fixed lung-window mapping
    where the levels are not found or implausible (less than 20 grey levels apart)."""
    g = np.asarray(g, np.float32)
    lv = _volume_levels(g) if g.ndim == 3 and len(g) > 1 else anatomy_levels(g[0] if g.ndim == 3 else g)
    if lv is None or lv[1] - lv[0] < 20:
        return lung_window_hu(g)
    lung, tissue = lv
    return HU_LUNG + (g - lung) * (HU_TISSUE - HU_LUNG) / (tissue - lung)
