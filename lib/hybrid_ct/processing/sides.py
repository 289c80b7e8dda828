"""The derived head ``lung_sides`` (contract.json "heads"): which lung voxels are the patient's left and right.

The network learns one lung; the sides are assigned after it, geometrically, not learned: the lungs are
the two largest connected components (26-connected), each taken to the patient's left or right by its
centre's physical x (LPS: +x is the patient's left); smaller pieces go by the side of their centre. When
the lungs touch (or only one is found) the lung is split at its own midline in physical x, which cuts a
single lung in two: the sides, and the per-side burden, are then only as good as that cut. A plain
(z, y, x) array is taken with the x index increasing towards the patient's left.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from hybrid_ct.contract import LABELS, SIDES
from hybrid_ct.processing.crop import box_offset, foreground_box

SECOND_LUNG = 0.1  # the second-largest component is the other lung from this share of the largest on


class _PhysX:
    """numpy (z, y, x) indices -> physical x; ``key`` is what the mapping depends on."""

    def __init__(self, offset, coef=None, ox: float = 0.0):
        self.offset, self.coef, self.ox = tuple(int(v) for v in offset), coef, float(ox)
        self.key = (self.offset, None if coef is None else tuple(float(c) for c in coef), self.ox)

    def __call__(self, idx):
        oz, oy, ox_ = self.offset
        if self.coef is None:
            return (idx[2] + ox_).astype(float)
        c = self.coef
        return self.ox + c[0] * (idx[2] + ox_) + c[1] * (idx[1] + oy) + c[2] * (idx[0] + oz)


def physical_x(img: sitk.Image | None, offset=(0, 0, 0)):
    """Function mapping numpy (z, y, x) indices of a box starting at ``offset`` to physical x (LPS: +x is
    the patient's left)."""
    if img is None:
        return _PhysX(offset)
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    sp = img.GetSpacing()
    return _PhysX(offset, [d[0, i] * sp[i] for i in range(3)], img.GetOrigin()[0])  # coef: index axis i -> x


def _centroids(comp: np.ndarray, n: int) -> list:
    """Index-space (z, y, x) centroid of each labelled component 1..n (faster than ndi.center_of_mass)."""
    out = []
    for k, sl in enumerate(ndi.find_objects(comp, n), start=1):
        m = comp[sl] == k
        total = m.sum()
        out.append(tuple(s.start + (np.arange(m.shape[ax]) * m.sum(axis=tuple(a for a in range(3) if a != ax))).sum()
                         / total for ax, s in enumerate(sl)))
    return out


# The split is asked for twice per prediction, on the same lung: by the post chain (``lung_sides``, which writes
# the sides of the lung but not those of the infection) and by the report (``burden.infection_burden``, which
# needs the side of every lung voxel, infection included). The last split is kept, keyed by the lung mask's
# digest and the geometry, and handed to the next caller asking for exactly that split (then dropped).
_LAST: dict = {}
_LAST_LOCK = threading.Lock()
splits_computed = 0  # how many splits were computed (not reused) in this process (tests/test_lung_sides.py)


def _split_key(lung: np.ndarray, phys_x):
    key = getattr(phys_x, "key", None)
    if key is None:
        return None
    digest = hashlib.blake2b(np.packbits(lung, axis=None).tobytes(), digest_size=20).hexdigest()
    return lung.shape, key, digest


def left_of(lung: np.ndarray, phys_x) -> np.ndarray:
    """Bool [z, y, x]: the voxels of ``lung`` (bool [z, y, x]) on the patient's left (see the module doc);
    ``phys_x`` maps (z, y, x) indices to physical x (``physical_x``). Read-only: the split of the same lung
    and geometry asked for just before is returned again, not recomputed."""
    lung = np.asarray(lung, dtype=bool)
    key = _split_key(lung, phys_x)
    if key is not None:
        with _LAST_LOCK:
            if _LAST.get("key") == key:
                left = _LAST["left"]
                _LAST.clear()
                return left
    left = _left_of(lung, phys_x)
    left.setflags(write=False)
    if key is not None:
        with _LAST_LOCK:
            _LAST.clear()
            _LAST.update(key=key, left=left)
    return left


def _left_of(lung: np.ndarray, phys_x) -> np.ndarray:
    global splits_computed
    splits_computed += 1
    comp, n = ndi.label(lung, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    order = np.argsort(sizes)[::-1]
    if n >= 2 and sizes[order[1]] >= SECOND_LUNG * sizes[order[0]]:
        cx = np.array([float(phys_x(c)) for c in _centroids(comp, n)])
        a, b = order[0], order[1]
        is_left = cx > (cx[a] + cx[b]) / 2
        is_left[a], is_left[b] = cx[a] > cx[b], cx[b] > cx[a]
        return np.concatenate([[False], is_left])[comp]
    left = np.zeros(lung.shape, bool)
    idx = np.nonzero(lung)
    if len(idx[0]):
        x = phys_x(idx)
        left[idx] = x > (x.min() + x.max()) / 2
    return left


def as_volume(label_img) -> tuple:
    """A label map (SimpleITK 2D / 3D, or a 2D / 3D array) -> (its [z, y, x] array, the 3D image or None)."""
    if isinstance(label_img, sitk.Image):
        img = label_img if label_img.GetDimension() == 3 else sitk.JoinSeries(label_img)
        return sitk.GetArrayFromImage(img), img
    arr = np.asarray(label_img)
    return arr.reshape((-1,) + arr.shape[-2:]), None


def lung_sides(label: np.ndarray, ref: sitk.Image | None = None) -> np.ndarray:
    """``label`` [z, y, x] (contract values) with its unsided lung (``LABELS["lung"]``) written as the
    right / left lung (``SIDES``); infection and lung that already has a side are kept. ``ref``: an image
    on the label's grid giving the patient geometry (None: x index increases towards the patient's left)."""
    lab = np.asarray(label)
    unsided = lab == LABELS["lung"]
    if not unsided.any():
        return lab
    if ref is not None and ref.GetDimension() == 2:
        ref = sitk.JoinSeries(ref)
    box = foreground_box(lab > 0, margin=0)
    part = lab[box]
    left = left_of(part > 0, physical_x(ref, box_offset(box)))
    out = lab.copy()
    sub = out[box]
    sub[unsided[box] & left] = SIDES["left"]
    sub[unsided[box] & ~left] = SIDES["right"]
    return out


__all__ = ["lung_sides", "left_of", "physical_x", "as_volume", "SECOND_LUNG"]
