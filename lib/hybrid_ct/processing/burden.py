"""Degree of infection: share of the lung volume that is infected, total and per lung, and its grade."""

from __future__ import annotations


import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from hybrid_ct.contract import report_key
from hybrid_ct.processing.crop import box_offset, foreground_box
from hybrid_ct.errors import InputError

TOTAL_PCT, LEFT_PCT, RIGHT_PCT = (report_key("burden", k) for k in ("total_pct", "left_pct", "right_pct"))


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _physical_x(img: sitk.Image | None, offset=(0, 0, 0)):
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


def infection_burden(label_img) -> dict:
    """``{"total_pct", "left_pct", "right_pct"}``: infection {2} as a share of the lung {1, 2}, in percent.

    The lungs are the two largest connected components, assigned to the patient's left / right from
    physical coordinates (LPS, +x is left); if they touch, the lung is split at its midline. A plain
    (z, y, x) array is taken with the x index increasing towards the patient's left.
    """
    if isinstance(label_img, sitk.Image):
        if label_img.GetNumberOfComponentsPerPixel() != 1 or label_img.GetDimension() not in (2, 3):
            raise InputError("label map must be a 2D or 3D single-component image")
        img = label_img if label_img.GetDimension() == 3 else sitk.JoinSeries(label_img)
        arr = sitk.GetArrayFromImage(img)
    elif isinstance(label_img, np.ndarray):
        if label_img.ndim not in (2, 3):
            raise InputError(f"label array must be 2D or 3D, got shape {label_img.shape}")
        img, arr = None, label_img.reshape((-1,) + label_img.shape[-2:])
    else:
        raise InputError(f"not a label map (got {type(label_img).__name__})")
    if arr.size and (arr.min() < 0 or arr.max() > 2):
        raise InputError(f"label map holds values outside {{0, 1, 2}} ({arr.min()}..{arr.max()})")
    box = foreground_box(arr > 0, margin=0)  # the lungs' box: the same sums, far fewer voxels
    if box is None:
        return {TOTAL_PCT: 0.0, LEFT_PCT: 0.0, RIGHT_PCT: 0.0}
    arr = arr[box]
    lung = arr > 0
    inf = arr == 2
    total = {TOTAL_PCT: _pct(int(inf.sum()), int(lung.sum()))}

    phys_x = _physical_x(img, box_offset(box))
    comp, n = ndi.label(lung, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    infected = np.bincount(comp[inf], minlength=n + 1)[1:]
    order = np.argsort(sizes)[::-1]
    if n >= 2 and sizes[order[1]] >= 0.1 * sizes[order[0]]:
        cx = np.array([float(phys_x(c)) for c in _centroids(comp, n)])
        a, b = order[0], order[1]
        mid = (cx[a] + cx[b]) / 2
        is_left = cx > mid  # small pieces go by the side of their centre
        is_left[a], is_left[b] = cx[a] > cx[b], cx[b] > cx[a]
        left = (int(infected[is_left].sum()), int(sizes[is_left].sum()))
        right = (int(infected[~is_left].sum()), int(sizes[~is_left].sum()))
    else:  # lungs touch (or only one): split at the midline of the lung mask
        idx = np.nonzero(lung)
        x = phys_x(idx)
        on_left = x > (x.min() + x.max()) / 2
        inf_here = inf[idx]
        left = (int((inf_here & on_left).sum()), int(on_left.sum()))
        right = (int((inf_here & ~on_left).sum()), int((~on_left).sum()))
    return {**total, LEFT_PCT: _pct(*left), RIGHT_PCT: _pct(*right)}


def severity_grade(pct) -> str:
    """MosMed-style grade: CT-0 none (0 %), CT-1 < 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 > 75 %."""
    try:
        p = float(pct)
    except (TypeError, ValueError) as e:
        raise InputError(f"infection percentage must be a number, got {pct!r}") from e
    if math.isnan(p) or p < 0 or p > 100:
        raise InputError(f"infection percentage must be within 0..100, got {pct!r}")
    if p == 0:
        return "CT-0"
    if p < 25:
        return "CT-1"
    if p < 50:
        return "CT-2"
    if p <= 75:
        return "CT-3"
    return "CT-4"
