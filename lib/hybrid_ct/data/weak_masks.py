"""Weak lung masks: the classical lung outline (threshold, body, holes) for pictures that carry only an
infection mask, and the orientation fixes that put stored pictures upright first."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from hybrid_ct.imaging.body import otsu_threshold
from hybrid_ct.errors import InputError


def rotate_to_display(arr2d: np.ndarray, how: str | None) -> np.ndarray:
    """Undo a known storage orientation: ``"transpose"`` (Ma Jun .npy), ``"rot90cw"`` (MedSeg, Ma Jun's
    Radiopaedia pictures: anterior on the left), ``"rot90ccw"`` (Ma Jun's coronacases pictures: anterior
    on the right), None."""
    if how is None:
        return arr2d
    if how == "rot90ccw":
        return np.ascontiguousarray(np.rot90(arr2d, k=1))
    if how == "transpose":
        return np.ascontiguousarray(arr2d.T)
    if how == "rot90cw":
        return np.ascontiguousarray(np.rot90(arr2d, k=-1))
    raise ValueError(how)


def _disk(r: int) -> np.ndarray:
    r = max(int(r), 1)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def weak_lung_mask(img01: np.ndarray, infection: np.ndarray | None = None, clear_border: bool = False) -> np.ndarray:
    """Classical lung mask of one axial slice, a WEAK label (documented method, no learning).

    ``img01``: the slice in lung-window units [0, 1] (``preprocess.window`` of HU; 8-bit pictures are
    v / 255). Steps: Gaussian smoothing (sigma = size / 256); Otsu threshold of the smoothed slice,
    clipped to 0.35..0.75 of the window (about -825..-225 HU); dark pixels below it; with
    ``clear_border`` the dark regions touching the image border (air around the patient) are dropped
    (for full field-of-view slices; MedSeg slices are cropped to the lungs, so the lungs touch the
    border and this stays off); dark components < 0.5 % of the slice are dropped (trachea, bowel gas,
    noise); union with the expert infection mask (consolidation is bright but is lung); closing with a
    disk of 2 % of the slice size (vessels, fissures); holes filled; the two largest components kept
    (the second only if >= 10 % of the first); opening with 0.5 %. Returns a bool mask.
    """
    a = np.asarray(img01, dtype=np.float32)
    if a.ndim != 2:
        raise InputError(f"weak_lung_mask needs one 2D slice, got shape {a.shape}")
    n = min(a.shape)
    s = ndi.gaussian_filter(a, sigma=max(1.0, n / 256))
    t = float(np.clip(otsu_threshold(s, value_range=(0.0, 1.0)), 0.35, 0.75))
    dark = s < t
    if clear_border:
        lab, k = ndi.label(dark)
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        dark &= ~np.isin(lab, edge[edge > 0])
    lab, k = ndi.label(dark)
    if k:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        dark = sizes[lab] >= 0.005 * a.size
    if infection is not None:
        dark |= np.asarray(infection, dtype=bool)
    dark = ndi.binary_closing(np.pad(dark, n), structure=_disk(0.02 * n))[n:-n, n:-n]
    dark = ndi.binary_fill_holes(dark)
    lab, k = ndi.label(dark)
    if k == 0:
        return dark
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] + ([order[1]] if k >= 2 and sizes[order[1]] >= 0.1 * sizes[order[0]] else [])
    mask = np.isin(lab, keep)
    mask = ndi.binary_opening(mask, structure=_disk(0.005 * n))
    if infection is not None:
        mask |= np.asarray(infection, dtype=bool)
    return mask
