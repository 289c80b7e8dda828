"""The lung parenchyma's density: is the scan one the model was validated on? (the guard), and the
standardisation that brings a denser scan back to the training range before the network.

The shipped model reads "denser than usual lung" as infection: an expiration, free-breathing, low-dose or
soft-kernel scan whose normal parenchyma sits at a median of about -690 HU instead of the usual -850 came back
with half of both lungs outlined as infection. Two answers:

- the guard: the report states the parenchyma's median HU (inside the predicted lung, the outlined infection
  left out) and warns when it is above ``max_median_hu`` of the contract (-750 HU; wording in
  ``contract.json`` -> report.lung_density);
- the standardisation (``parenchyma_level``, ``standardise``): the level of the parenchyma -- the mode of
  the air-density voxels inside the body, which is the mode inside the expert lung masks to the 10 HU bin on
  LUNG1-001 and the imlab volumes -- is compared with the densest HU volume the model trained on
  (``training_max_level_hu``, measured by ``python -m hybrid_ct.data.sources``: the
  phantoms, -842.5 HU). A denser scan is
  mapped back by a monotone piecewise-linear map with landmarks at air (-1000 HU), the level and soft tissue
  (-100 HU), a landmark-based intensity standardisation (Nyul & Udupa, 1999): consolidation and soft tissue
  stay as they are, ground glass keeps its order. A scan at or below the training level is untouched. The
  mode, not the median, so that lesions -- the upper tail -- do not move it until most of the lung is
  involved; a level above ``MAX_LEVEL_HU`` (-600 HU) is read as such a lung, not as an expiration scan.
  The limit of the idea: faint ground glass filling most of both lungs looks like an expiration scan.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from hybrid_ct.contract import LABELS, REPORT

DENSITY = REPORT["lung_density"]
MAX_MEDIAN_HU = float(DENSITY["max_median_hu"])
WARNING = str(DENSITY["warning"])
MIN_VOXELS = 1000  # fewer parenchyma voxels than this: no density stated
STANDARDISE = DENSITY["standardise"]
TRAINING_MAX_LEVEL_HU = float(STANDARDISE["training_max_level_hu"])
MAX_SHIFT_HU = float(STANDARDISE["max_shift_hu"])
# above this the mode is not aerated parenchyma: with synthetic ground glass drawn into LUNG1-001's expert lungs
# (benchmarks/protocol_variants.py --lesion-load) the level stays within 10 HU of the lung's own up to 65 % of
# the lung involved and jumps to the lesions' own -420 HU at 74 %; such a scan is left as it is
MAX_LEVEL_HU = float(STANDARDISE["max_level_hu"])
AIR_HU, SOFT_HU = -1000.0, -100.0  # the landmarks the map keeps in place
LEVEL_RANGE_HU = (-990.0, -300.0)  # the parenchyma is looked for here: airway air below, vessels and walls above
BIN_HU, SMOOTH_HU = 5.0, 20.0


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


def parenchyma_level(hu: np.ndarray, body: np.ndarray | None) -> float | None:
    """The mode (HU) of the voxels in ``LEVEL_RANGE_HU`` inside ``body`` (bool, the same grid; None: the whole
    volume), on a histogram of 5 HU bins smoothed over 20 HU; None with fewer than ``MIN_VOXELS`` such voxels."""
    hu = np.asarray(hu)
    sel = (hu > LEVEL_RANGE_HU[0]) & (hu < LEVEL_RANGE_HU[1])
    if body is not None:
        sel &= np.asarray(body, bool)
    v = hu[sel]
    if v.size < MIN_VOXELS:
        return None
    lo, hi = LEVEL_RANGE_HU
    h, edges = np.histogram(v, bins=int((hi - lo) / BIN_HU), range=(lo, hi))
    h = gaussian_filter1d(h.astype(np.float64), SMOOTH_HU / BIN_HU)
    return float(edges[int(np.argmax(h))] + BIN_HU / 2)


def standardise_shift(level: float | None, reference: float = TRAINING_MAX_LEVEL_HU,
                      max_shift: float = MAX_SHIFT_HU) -> float:
    """How many HU the parenchyma is mapped down: 0 at or below ``reference`` and above ``MAX_LEVEL_HU`` (a
    lung mostly filled by lesions), at most ``max_shift``."""
    if level is None or level > MAX_LEVEL_HU:
        return 0.0
    return float(np.clip(level - reference, 0.0, max_shift))


def standardise(hu: np.ndarray, level: float, shift: float) -> np.ndarray:
    """``hu`` with the landmarks (AIR_HU, level, SOFT_HU) mapped to (AIR_HU, level - shift, SOFT_HU), linear
    between them; values outside [AIR_HU, SOFT_HU] unchanged. A new float32 array (``hu`` itself if no shift)."""
    if shift <= 0:
        return hu
    out = np.array(hu, dtype=np.float32, copy=True)
    m = (out > AIR_HU) & (out < SOFT_HU)
    out[m] = np.interp(out[m], [AIR_HU, level, SOFT_HU], [AIR_HU, level - shift, SOFT_HU]).astype(np.float32)
    return out


def standardise_note(shift: float) -> str | None:
    return str(STANDARDISE["note"]).format(shift=shift) if shift > 0 else None
