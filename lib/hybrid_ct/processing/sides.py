"""The derived head ``lung_sides`` (contract.json "heads"): which lung voxels are the patient's left and right.

The network learns one lung; the sides are assigned after it, geometrically, not learned: the lungs are
the two largest connected components (26-connected), each taken to the patient's left or right by its
centre's physical x (LPS: +x is the patient's left); smaller pieces go by the side of their centre. When
the lungs touch (or only one is found) the lung is split at its own midline in physical x, which cuts a
single lung in two: the sides, and the per-side burden, are then only as good as that cut. A plain
(z, y, x) array is taken with the x index increasing towards the patient's left.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from hybrid_ct.contract import LABELS, SIDES
from hybrid_ct.processing.crop import box_offset, foreground_box

SECOND_LUNG = 0.1  # the second-largest component is the other lung from this share of the largest on


def physical_x(img: sitk.Image | None, offset=(0, 0, 0)):
    """Function mapping numpy (z, y, x) indices of a box starting at ``offset`` to physical x (LPS: +x is
    the patient's left)."""
    oz, oy, ox_ = offset
    if img is None:
        return lambda idx: (idx[2] + ox_).astype(float)
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    sp, ox = img.GetSpacing(), img.GetOrigin()[0]
    coef = [d[0, i] * sp[i] for i in range(3)]  # contribution of SimpleITK index axis i to x
    return lambda idx: ox + coef[0] * (idx[2] + ox_) + coef[1] * (idx[1] + oy) + coef[2] * (idx[0] + oz)


def _centroids(comp: np.ndarray, n: int) -> list:
    """Index-space (z, y, x) centroid of each labelled component 1..n (faster than ndi.center_of_mass)."""
    out = []
    for k, sl in enumerate(ndi.find_objects(comp, n), start=1):
        m = comp[sl] == k
        total = m.sum()
        out.append(tuple(s.start + (np.arange(m.shape[ax]) * m.sum(axis=tuple(a for a in range(3) if a != ax))).sum()
                         / total for ax, s in enumerate(sl)))
    return out


def left_of(lung: np.ndarray, phys_x) -> np.ndarray:
    """Bool [z, y, x]: the voxels of ``lung`` (bool [z, y, x]) on the patient's left (see the module doc);
    ``phys_x`` maps (z, y, x) indices to physical x (``physical_x``)."""
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
