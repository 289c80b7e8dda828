"""The patient's body and the air inside it, from Hounsfield units: the body mask of the one pre-processing
chain, the chest check's air fraction, and the 8-bit calibration's anatomy levels all use these."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

BODY_HU = -500.0
"""Air and aerated lung lie below, the body's tissue above: the body is the largest region above it."""


def otsu_threshold(values: np.ndarray, bins: int = 128, value_range=None) -> float:
    """Otsu's threshold of ``values``; the histogram spans ``value_range`` (default: min..max)."""
    values = np.asarray(values, np.float64).ravel()
    lo, hi = value_range or (float(values.min()), float(values.max()))
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centers[int(np.argmax(w0 * w1 * (mu0 - mu1) ** 2))])


def largest_filled(mask: np.ndarray):
    """[n, h, w] bool -> (its largest connected region, that region with its holes filled per plane:
    background regions of a plane that do not reach the plane's border)."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask, mask
    region = mask
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        region = lab == sizes.argmax()
    per_slice = np.zeros((3, 3, 3), dtype=bool)
    per_slice[1] = ndi.generate_binary_structure(2, 1)
    bg, _ = ndi.label(~region, structure=per_slice)
    edge = np.unique(np.concatenate([bg[:, 0].ravel(), bg[:, -1].ravel(), bg[:, :, 0].ravel(), bg[:, :, -1].ravel()]))
    return region, region | ~np.isin(bg, edge)


def body_region(a: np.ndarray, open_px: int = 0, threshold: float = BODY_HU) -> np.ndarray:
    """[n, h, w] HU -> the body: the largest connected region above -500 HU, holes filled per plane;
    ``open_px``: first opened in-plane by a disk of that radius, which cuts off the table top (it touched
    the back on LUNG1-001, so the body held the table and the lung outlined on it stayed)."""
    mask = a > threshold
    if open_px:
        disk = np.hypot(*np.ogrid[-open_px:open_px + 1, -open_px:open_px + 1]) <= open_px
        mask = ndi.binary_opening(mask, structure=disk[None])
    return largest_filled(mask)[1]


def lps_planes(img: sitk.Image):
    """-> (image in LPS order, its array as [planes, h, w]: axial slices, or the one slice's own plane)."""
    oriented = sitk.DICOMOrient(img, "LPS")
    a = sitk.GetArrayViewFromImage(oriented)  # a view: ``oriented`` must stay alive
    plane = [n for n in a.shape if n != 1]
    if len(plane) == 2:  # a single slice (axial, coronal or sagittal): work in its own plane
        a = a.reshape((1, *plane))
    return oriented, a


def body_mask(img: sitk.Image, threshold: float = BODY_HU) -> np.ndarray:
    """Boolean [z, y, x] mask of the patient's body in ``img``'s own array layout (see ``body_region``): air
    outside it (room, table gap, clothes) is not lung."""
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    oriented, a = lps_planes(img)
    k = 2 if max(a.shape[1:]) > 256 else 1  # in-plane stride: a body outline needs no sub-millimetre detail
    px = float(min(oriented.GetSpacing()[:2])) * k  # whole volumes: open by ~6 mm (thinner than a table top)
    body = body_region(a[:, ::k, ::k], open_px=int(6.0 // px) if a.shape[0] >= 8 and px <= 3.0 else 0,
                       threshold=threshold)
    if k > 1:
        body = body.repeat(k, axis=1).repeat(k, axis=2)[:, : a.shape[1], : a.shape[2]]
    m = sitk.GetImageFromArray(body.reshape(sitk.GetArrayViewFromImage(oriented).shape).astype(np.uint8))
    m.CopyInformation(oriented)
    return sitk.GetArrayFromImage(sitk.DICOMOrient(m, code)).astype(bool)


def lung_air_fraction(img: sitk.Image) -> float:
    """Share of the body (``body_region``) that is air-density (< -500 HU): lungs and airways in a chest,
    bowel gas elsewhere. Large images are subsampled (a ratio does not need every voxel)."""
    _, a = lps_planes(img)
    step = max(1, int(np.ceil(max(a.shape[1:]) / 256)))
    zstep = max(1, int(np.ceil(a.shape[0] / 160)))
    a = a[::zstep, ::step, ::step]
    filled = body_region(a)
    total = int(filled.sum())
    return float((filled & (a < BODY_HU)).sum()) / total if total else 0.0


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """2D bool mask -> its convex hull (filled), on the same grid."""
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    try:
        hull = ConvexHull(np.stack([xs, ys], 1).astype(float))
    except (QhullError, ValueError):  # fewer than 3 points, or all on a line
        return mask.copy()
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    eq = hull.equations
    inside = (eq[:, :2] @ np.stack([xx.ravel(), yy.ravel()]) + eq[:, 2:] <= 0.5).all(0)
    return inside.reshape(mask.shape) | mask
