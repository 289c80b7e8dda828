"""The lung parenchyma's density: is the scan one the model was validated on? (the guard)

The shipped model reads "denser than usual lung" as infection: an expiration, free-breathing, low-dose or
soft-kernel scan whose normal parenchyma sits at a median of about -690 HU instead of the usual -850 came back
with half of both lungs outlined as infection. The report therefore states the parenchyma's median HU (inside
the predicted lung, the outlined infection left out) and warns when it is above ``max_median_hu`` of the
contract (-750 HU; wording in ``contract.json`` -> report.lung_density).
"""
from __future__ import annotations

import numpy as np

from hybrid_ct.contract import LABELS, REPORT

DENSITY = REPORT["lung_density"]
MAX_MEDIAN_HU = float(DENSITY["max_median_hu"])
WARNING = str(DENSITY["warning"])
MIN_VOXELS = 1000  # fewer parenchyma voxels than this: no density stated


def lung_density(hu: np.ndarray, label: np.ndarray) -> dict:
    """``hu`` and ``label`` on the same grid (contract labels) -> the report's ``lung_density`` block:
    ``{"median_hu": float or None, "max_median_hu": float, "warning": str or None}``."""
    hu, label = np.asarray(hu), np.asarray(label)
    if hu.shape != label.shape:
        raise ValueError(f"image {hu.shape} and label {label.shape} differ in shape")
    parenchyma = (label > 0) & (label != LABELS["infection"])  # lung of either side or none, infection left out
    n = int(parenchyma.sum())
    med = float(np.median(hu[parenchyma])) if n >= MIN_VOXELS else None
    warn = WARNING if med is not None and med > MAX_MEDIAN_HU else None
    return {"median_hu": med, "max_median_hu": MAX_MEDIAN_HU, "warning": warn}
