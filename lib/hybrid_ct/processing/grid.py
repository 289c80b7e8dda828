"""The numbers of the one pre-processing path shared by the CLI, the MONAI Label app and the trainer.

A CT volume goes to the model as a stack of axial slices: reoriented to LPS (rows anterior to
posterior, columns patient right to left, slice 0 inferior -- the usual radiological display),
windowed to [0, 1] with the lung window, padded to a square field of view with the window minimum and
resized to ``size`` x ``size``. The steps are run as MONAI dictionary transforms
(``hybrid_ct.processing.transforms.pre_transforms``, inverted by ``post_transforms``); this module holds the
arithmetic they share (orientation, square padding, slice resizing) and the array-level entry points
``to_model_slices`` / ``label_to_model_slices`` / ``from_model_slices`` used by the dataset builders.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from hybrid_ct.errors import InputError

WINDOW_HU = (-1350.0, 150.0)
"""Lung window, width 1500 HU / level -600 HU: -1350 HU maps to 0 and 150 HU to 1."""


def window(arr) -> np.ndarray:
    """Map Hounsfield units onto [0, 1] with the lung window (values outside are clipped); float32."""
    lo, hi = WINDOW_HU
    out = (np.asarray(arr, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, np.float32(0.0), np.float32(1.0))


@dataclass
class SliceContext:
    """Everything needed to bring model-space slices back to the original image grid."""

    size: int
    orig_shape: tuple  # (z, y, x) of the original array
    perm: tuple  # numpy axes of the original array that give the canonical (z, y, x) axes
    flips: tuple  # canonical numpy axes flipped after the permutation
    canon_shape: tuple  # (D, H, W) after reorientation
    canon_spacing: tuple  # (z, y, x) spacing in mm after reorientation
    pad: tuple  # (top, bottom, left, right) pixels added to reach a square field of view
    spacing: tuple  # geometry of the original image (SimpleITK order)
    origin: tuple
    direction: tuple


def orientation(direction):
    """Axis permutation and flips that bring an image array of this SimpleITK ``direction`` to LPS (nearest
    axes; oblique is snapped): ``perm``, the numpy axes (z, y, x) of the array that give the canonical
    (z, y, x) axes, and ``flips``, the canonical axes flipped after the permutation."""
    d = np.array(direction, dtype=float).reshape(3, 3)  # column i: physical direction of index axis i
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[k, p[k]]) for k in range(3)))
    # best[k] = index axis (SimpleITK order) running along physical axis k (x, y, z)
    perm = tuple(2 - best[k] for k in (2, 1, 0))  # numpy axes are (z, y, x) = index axes (2, 1, 0)
    flips = tuple(c for c, k in enumerate((2, 1, 0)) if d[k, best[k]] < 0)
    return perm, flips


def to_canonical(arr: np.ndarray, perm, flips) -> np.ndarray:
    """Reorient the last three axes (leading axes are kept); a view."""
    lead = arr.ndim - 3
    out = np.transpose(arr, tuple(range(lead)) + tuple(lead + p for p in perm))
    return np.flip(out, axis=tuple(lead + f for f in flips)) if flips else out


def from_canonical(arr: np.ndarray, perm, flips) -> np.ndarray:
    """Inverse of ``to_canonical`` on the last three axes (leading axes are kept); a view."""
    lead = arr.ndim - 3
    if flips:
        arr = np.flip(arr, axis=tuple(lead + f for f in flips))
    inv = np.argsort(perm)
    return np.transpose(arr, tuple(range(lead)) + tuple(lead + int(i) for i in inv))


def square_pad(canon_shape, canon_spacing) -> tuple:
    """(top, bottom, left, right) pixels that make the axial field of view square (keeps the aspect)."""
    _, h, w = canon_shape
    _, sy, sx = canon_spacing
    fov = max(h * sy, w * sx)
    hp = max(h, int(round(fov / sy)))
    wp = max(w, int(round(fov / sx)))
    top, left = (hp - h) // 2, (wp - w) // 2
    return (top, hp - h - top, left, wp - w - left)


FOVS = ("square", "lungs")
"""How the axial field of view is chosen (``NetConfig.fov``): "square", the whole image padded to a
square; "lungs", the box around the lungs' air over all slices (``crop.lung_air_box``) plus
``LUNG_MARGIN_MM``, made square, so the lungs fill the model grid. A body box does
not do it: on P001, cap001 and LUNG1-001 the body (arms, a field of view cut at the skin) spans the
whole image width, so its square box is the whole image (measured when this was built)."""
LUNG_MARGIN_MM = 20.0  # around the aerated lung: dense consolidation at a base or a periphery, the pleura
LUNG_MIN_FRACTION = 0.02  # an air box under 2 % of the image is not a pair of lungs: keep the whole image


def box_pad(box, canon_shape, canon_spacing, margin_mm: float = LUNG_MARGIN_MM) -> tuple:
    """(top, bottom, left, right) of a square field of view (in mm) centred on ``box`` = (y0, y1, x0, x1)
    (canonical pixels) plus ``margin_mm``; a negative value crops, a positive one pads (the square may
    reach past the image). ``square_pad`` when there is no box, when it is under ``LUNG_MIN_FRACTION`` of
    the image, or when it would not be smaller than the square field of view. One box per volume, so
    neighbouring slices (2.5D) and the 3D rules share one grid."""
    _, h, w = canon_shape
    _, sy, sx = canon_spacing
    square = square_pad(canon_shape, canon_spacing)
    if box is None or (box[1] - box[0]) * (box[3] - box[2]) < LUNG_MIN_FRACTION * h * w:
        return square
    y0, y1 = box[0] - margin_mm / sy, box[1] + margin_mm / sy
    x0, x1 = box[2] - margin_mm / sx, box[3] + margin_mm / sx
    fov = max((y1 - y0) * sy, (x1 - x0) * sx)
    if fov >= max(h * sy, w * sx):
        return square
    rows, cols = int(round(fov / sy)), int(round(fov / sx))
    r0, c0 = int(round((y0 + y1 - rows) / 2)), int(round((x0 + x1 - cols) / 2))
    return (-r0, r0 + rows - h, -c0, c0 + cols - w)


def _kept(n: int, before: int, after: int) -> tuple:
    """Rows [a, b) of an axis of length n inside a field of view that adds ``before`` / ``after`` pixels
    (negative: removes them)."""
    return max(0, -before), n - max(0, -after)


def check_size(size) -> int:
    if int(size) < 8:
        raise InputError(f"model slice size must be at least 8, got {size}")
    return int(size)


def make_context(img: sitk.Image, size: int = 256) -> SliceContext:
    """The geometry of ``to_model_slices`` (no pixels touched)."""
    if not isinstance(img, sitk.Image) or img.GetDimension() != 3:
        raise InputError("expected a 3D SimpleITK image")
    size = check_size(size)
    perm, flips = orientation(img.GetDirection())
    orig_shape = tuple(reversed(img.GetSize()))
    canon_shape = tuple(orig_shape[p] for p in perm)
    sp_zyx = tuple(reversed(img.GetSpacing()))
    canon_spacing = tuple(float(sp_zyx[p]) for p in perm)
    return SliceContext(size, orig_shape, perm, flips, canon_shape, canon_spacing,
                        square_pad(canon_shape, canon_spacing), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def slice_spacing(img: sitk.Image) -> float:
    """The distance in mm between the model's axial slices of ``img`` (its canonical z spacing)."""
    return make_context(img).canon_spacing[0]


def _resize(t, hw, mode):
    import torch.nn.functional as F

    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    if mode == "nearest":
        return F.interpolate(t, size=hw, mode="nearest-exact")
    shrink = hw[0] < t.shape[-2] or hw[1] < t.shape[-1]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=shrink)


def canon_to_grid(canon: np.ndarray, pad, size: int, fill: float, mode: str, chunk: int = 32) -> np.ndarray:
    """Canonical [D, H, W] -> float32 [D, 1, size, size]: padded with ``fill`` to ``pad``, then resized
    (``mode`` "bilinear", antialiased when shrinking, or "nearest")."""
    import torch

    top, bottom, left, right = pad
    (r0, r1), (c0, c1) = _kept(canon.shape[1], top, bottom), _kept(canon.shape[2], left, right)
    widths = ((0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0)))
    out = np.empty((canon.shape[0], 1, size, size), dtype=np.float32)
    for z0 in range(0, canon.shape[0], chunk):
        part = np.pad(canon[z0:z0 + chunk, r0:r1, c0:c1], widths, constant_values=fill)
        t = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))[:, None]
        out[z0:z0 + chunk] = _resize(t, (size, size), mode).numpy()
    return out


def grid_to_canon(p: np.ndarray, pad, canon_shape, size: int, mode: str = "bilinear", chunk: int = 16) -> np.ndarray:
    """Inverse of ``canon_to_grid`` for model outputs [D, C, size, size] -> float32 [C, D, H, W]."""
    import torch

    d, h, w = canon_shape
    if p.ndim != 4 or p.shape[0] != d or p.shape[2:] != (size, size):
        raise InputError(f"model output shape {p.shape} does not match [D={d}, C, {size}, {size}]")
    top, bottom, left, right = pad
    hp, wp = h + top + bottom, w + left + right
    # Slices that are all zero (outside the lung slab, where the network did not run) resize to zero:
    # only the others are resized (the same values).
    # A cropped field of view (negative pad, fov "body") leaves the image outside it at zero: background.
    (r0, r1), (c0, c1) = _kept(h, top, bottom), _kept(w, left, right)
    todo = np.flatnonzero(p.reshape(d, -1).any(axis=1))
    whole = len(todo) == d and (r0, r1, c0, c1) == (0, h, 0, w)
    canon = np.empty((p.shape[1], d, h, w), dtype=np.float32) if whole else \
        np.zeros((p.shape[1], d, h, w), dtype=np.float32)
    for i in range(0, len(todo), chunk):
        zs = todo[i:i + chunk]
        t = torch.from_numpy(np.ascontiguousarray(p[zs], dtype=np.float32))
        big = _resize(t, (hp, wp), mode).numpy()
        canon[:, zs, r0:r1, c0:c1] = big[:, :, r0 + top:r1 + top, c0 + left:c1 + left].transpose(1, 0, 2, 3)
    return canon



def from_model_slices(prob, ctx: SliceContext) -> np.ndarray:
    """Bring model outputs [D, C, S, S] (or [D, S, S]) back to float32 [C, z, y, x] on the original grid."""
    p = prob.detach().cpu().numpy() if hasattr(prob, "detach") else np.asarray(prob)
    if p.ndim == 3:
        p = p[:, None]
    canon = grid_to_canon(p, ctx.pad, ctx.canon_shape, ctx.size)
    return np.ascontiguousarray(from_canonical(canon, ctx.perm, ctx.flips))


def array_to_image(arr_zyx, ref_img: sitk.Image) -> sitk.Image:
    """Wrap a (z, y, x) array as an image with the geometry (spacing, origin, direction) of ``ref_img``."""
    arr = np.asarray(arr_zyx)
    if arr.shape != tuple(reversed(ref_img.GetSize())):
        raise InputError(f"array shape {arr.shape} does not match the reference image (z, y, x) "
                         f"{tuple(reversed(ref_img.GetSize()))}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(ref_img)
    return out
