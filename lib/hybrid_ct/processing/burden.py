"""Degree of infection: share of the lung volume that is infected, total and per lung, and its grade."""

from __future__ import annotations


import math

import numpy as np
import SimpleITK as sitk

from hybrid_ct.contract import LABELS, report_key
from hybrid_ct.errors import InputError
from hybrid_ct.processing.crop import box_offset, foreground_box
from hybrid_ct.processing.sides import as_volume, left_of, physical_x

TOTAL_PCT, LEFT_PCT, RIGHT_PCT = (report_key("burden", k) for k in ("total_pct", "left_pct", "right_pct"))


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def infection_burden(label_img) -> dict:
    """``{"total_pct", "left_pct", "right_pct"}``: infection {2} as a share of the lung (every label but 0), in
    percent. The sides are the derived head's (``processing.sides.left_of``: the two largest lung components
    by physical x, LPS +x is left; lungs that touch are split at their midline), computed on the whole lung,
    infection included, so a label map written by ``sides.lung_sides`` has exactly these sides. A plain
    (z, y, x) array is taken with the x index increasing towards the patient's left.
    """
    if isinstance(label_img, sitk.Image):
        if label_img.GetNumberOfComponentsPerPixel() != 1 or label_img.GetDimension() not in (2, 3):
            raise InputError("label map must be a 2D or 3D single-component image")
    elif isinstance(label_img, np.ndarray):
        if label_img.ndim not in (2, 3):
            raise InputError(f"label array must be 2D or 3D, got shape {label_img.shape}")
    else:
        raise InputError(f"not a label map (got {type(label_img).__name__})")
    arr, img = as_volume(label_img)
    if arr.size and arr.min() < 0:
        raise InputError(f"label map holds negative values ({arr.min()}): not a label map")
    box = foreground_box(arr > 0, margin=0)  # the lungs' box: the same sums, far fewer voxels
    if box is None:
        return {TOTAL_PCT: 0.0, LEFT_PCT: 0.0, RIGHT_PCT: 0.0}
    arr = arr[box]
    bad = sorted(set(np.flatnonzero(np.bincount(arr.astype(np.int64).ravel()))) - set(LABELS.values()))
    if bad:
        raise InputError(f"label map holds values {bad[:5]} outside the contract's {sorted(LABELS.values())}")
    lung = arr > 0
    inf = arr == LABELS["infection"]
    left = left_of(lung, physical_x(img, box_offset(box)))
    right = lung & ~left
    return {TOTAL_PCT: _pct(int(inf.sum()), int(lung.sum())),
            LEFT_PCT: _pct(int((inf & left).sum()), int(left.sum())),
            RIGHT_PCT: _pct(int((inf & right).sum()), int(right.sum()))}


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
