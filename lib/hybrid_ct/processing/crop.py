"""Do less work: the lung slab before the network, and the lungs' box after it.

A chest CT often reaches into the neck and the abdomen, and the lungs fill a fraction of each slice.
Two cheap facts avoid work that cannot change the result:

- **the lung slab** (``lung_slab``): the slices that hold air inside the body, found on the canonical
  HU volume at about ``SLAB_GRID_MM`` in-plane (a few ms): the large 3D air components inside the body
  mask (lungs and airways; small bowel-gas pockets and sinuses do not set it), their cranio-caudal
  extent, plus ``SLAB_MARGIN_MM``. ``Predictor`` runs the network on these slices only and grows the
  slab while the network still outlines lung on its edge slice (``grow_slab``), so lung that is not
  aerated (dense consolidation at a base) is followed too; slices outside it are background.
- **the lungs' box** (``foreground_box``): every 3D rule after the network (components, body rule,
  anatomy, report volumes) only looks at predicted lung and its surroundings, so it runs on the
  bounding box of the predicted lung plus a one-voxel background margin. With that margin, a component
  touches the box's in-plane edge only where the box edge is the image border, so the border rules
  are unchanged; labelling, erosion and dilation see background beyond the box either way. The
  results are the same as on the whole volume (tests/test_crop.py checks each function).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from hybrid_ct.imaging.body import BODY_HU

SLAB_GRID_MM = 4.0  # in-plane grid of the slab search: the lungs are centimetres wide
SLAB_MIN_COMPONENT = 0.05  # air components below 5 % of the largest do not set the slab (bowel gas, sinuses)
SLAB_MARGIN_MM = 10.0  # added above and below the air: lung tips, partial-volume slices, a dense base
SLAB_EDGE_FRACTION = 0.005  # grow while the edge slice holds lung >= 0.5 % of the largest slice's lung
MIN_SLAB_SLICES = 8  # fewer slices (a picture, a short stack): run them all, as before


def lung_slab(hu: np.ndarray, body: np.ndarray | None, spacing_zyx, air_hu: float = BODY_HU) -> tuple[int, int] | None:
    """Slices ``[z0, z1)`` of a canonical HU volume [D, H, W] (axis 0 cranio-caudal) that hold the
    lungs, with ``SLAB_MARGIN_MM`` on each side; None when the whole volume should be run (a short
    stack, no body mask, no air inside the body)."""
    d = hu.shape[0]
    if d < MIN_SLAB_SLICES:
        return None
    boxes = _lung_air_boxes(hu, body, spacing_zyx, air_hu)
    if not boxes:
        return None
    z0 = min(b[0].start for b, _ in boxes)
    z1 = max(b[0].stop for b, _ in boxes)
    m = int(math.ceil(SLAB_MARGIN_MM / max(float(spacing_zyx[0]), 1e-3)))
    return max(0, z0 - m), min(d, z1 + m)


def _lung_air_boxes(hu: np.ndarray, body: np.ndarray | None, spacing_zyx, air_hu: float) -> list:
    """The bounding boxes of the large 3D air components inside ``body`` (lungs and airways), found at
    about ``SLAB_GRID_MM`` in-plane: [(box on the low-resolution grid, in-plane stride k)]."""
    if body is None or body.shape != hu.shape:
        return []
    k = max(1, int(round(SLAB_GRID_MM / max(float(spacing_zyx[1]), float(spacing_zyx[2]), 1e-3))))
    air = body[:, ::k, ::k] & (hu[:, ::k, ::k] < air_hu)
    comp, n = ndimage.label(air)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(air, comp, index=np.arange(1, n + 1))
    boxes = ndimage.find_objects(comp)
    return [(boxes[i], k) for i in np.flatnonzero(sizes >= SLAB_MIN_COMPONENT * sizes.max())]


def lung_air_box(hu: np.ndarray, body: np.ndarray | None, spacing_zyx, air_hu: float = BODY_HU) -> tuple | None:
    """In-plane ``(y0, y1, x0, x1)`` (canonical pixels) around the lungs' air over all slices of a
    canonical HU volume, widened to its mirror image about the body's midline (a lung that is dense on
    every slice, a white-out, is not air but lies opposite the other one): the field of view
    ``fov="lungs"`` is built on it (``preprocess.box_pad``). None -- keep the whole image -- for a
    picture or a short stack (one dense slice can hide a whole lung: MedSeg's 0.jpg lost its right lung
    to a box built on air when this was tried) and when no air is found inside the body."""
    if hu.shape[0] < MIN_SLAB_SLICES:
        return None
    boxes = _lung_air_boxes(hu, body, spacing_zyx, air_hu)
    if not boxes:
        return None
    h, w = hu.shape[1:]
    x0, x1 = min(b[2].start * k for b, k in boxes), min(w, max(b[2].stop * k for b, k in boxes))
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    mid = (cols[0] + cols[-1] + 1) / 2
    x0, x1 = max(0, int(min(x0, 2 * mid - x1))), min(w, int(math.ceil(max(x1, 2 * mid - x0))))
    return min(b[1].start * k for b, k in boxes), min(h, max(b[1].stop * k for b, k in boxes)), x0, x1


def margin_slices(spacing_z: float) -> int:
    """``SLAB_MARGIN_MM`` in slices: the step by which ``grow_slab`` widens the slab."""
    return max(1, int(math.ceil(SLAB_MARGIN_MM / max(float(spacing_z), 1e-3))))


def grow_slab(lung_area: np.ndarray, lo: int, hi: int, depth: int, step: int) -> tuple[int, int]:
    """The slab ``[lo, hi)`` widened by ``step`` slices on each side whose edge slice still holds lung
    (``lung_area`` per slice, from the network; at least ``SLAB_EDGE_FRACTION`` of its largest value)."""
    peak = float(lung_area[lo:hi].max()) if hi > lo else 0.0
    if peak <= 0:
        return lo, hi
    floor = max(1.0, SLAB_EDGE_FRACTION * peak)
    if lo > 0 and lung_area[lo] >= floor:
        lo = max(0, lo - step)
    if hi < depth and lung_area[hi - 1] >= floor:
        hi = min(depth, hi + step)
    return lo, hi


def foreground_box(mask: np.ndarray, margin: int = 1, align: tuple = (1, 1, 1)) -> tuple | None:
    """Bounding box of ``mask`` [z, y, x] as a tuple of slices, widened by ``margin`` voxels (clipped to
    the array) with each start rounded down to a multiple of ``align`` (a strided rule keeps its grid);
    None when the mask is empty. Cheap: one pass over the slices, then two over the slab."""
    if mask.size == 0:
        return None
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if not len(zs):
        return None
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    slab = mask[z0:z1]
    ys = np.flatnonzero(slab.any(axis=(0, 2)))
    xs = np.flatnonzero(slab.any(axis=(0, 1)))
    box = []
    for (a, b), n, al in zip(((z0, z1), (int(ys[0]), int(ys[-1]) + 1), (int(xs[0]), int(xs[-1]) + 1)),
                             mask.shape, align):
        a = max(0, a - margin)
        box.append(slice(a - a % max(1, int(al)), min(n, b + margin)))
    return tuple(box)


def box_offset(box) -> tuple:
    """(z, y, x) index of a box's first voxel."""
    return tuple(s.start for s in box)


def shifted_origin(origin, spacing_xyz, direction, offset_zyx) -> tuple:
    """Physical origin (SimpleITK order) of a sub-array that starts at ``offset_zyx`` of an image."""
    d = np.asarray(direction, float).reshape(3, 3)
    idx = np.array(offset_zyx[::-1], float) * np.asarray(spacing_xyz, float)
    return tuple(float(v) for v in np.asarray(origin, float) + d @ idx)


def is_whole(box, shape) -> bool:
    return all(s.start == 0 and s.stop == n for s, n in zip(box, shape))
