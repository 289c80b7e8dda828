"""The one pre-processing path shared by the CLI, the MONAI Label app and the trainer.

A CT volume goes to the model as a stack of axial slices: reoriented to LPS (rows anterior to
posterior, columns patient right to left, slice 0 inferior -- the usual radiological display),
windowed to [0, 1] with the lung window, padded to a square field of view with the window minimum and
resized to ``size`` x ``size``. ``from_model_slices`` undoes every step so the model's output lands
on the original voxel grid.
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


def _orientation(img: sitk.Image):
    """Axis permutation and flips that bring the image array to LPS (nearest axes; oblique is snapped)."""
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)  # column i: physical direction of index axis i
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[k, p[k]]) for k in range(3)))
    # best[k] = index axis (SimpleITK order) running along physical axis k (x, y, z)
    perm = tuple(2 - best[k] for k in (2, 1, 0))  # numpy axes are (z, y, x) = index axes (2, 1, 0)
    flips = tuple(c for c, k in enumerate((2, 1, 0)) if d[k, best[k]] < 0)
    return perm, flips


def _to_canonical(arr: np.ndarray, perm, flips) -> np.ndarray:
    out = np.transpose(arr, perm)
    return np.flip(out, axis=flips) if flips else out


def _from_canonical(arr: np.ndarray, perm, flips) -> np.ndarray:
    """Inverse of ``_to_canonical`` on the last three axes (leading axes are kept)."""
    lead = arr.ndim - 3
    if flips:
        arr = np.flip(arr, axis=tuple(lead + f for f in flips))
    inv = np.argsort(perm)
    return np.transpose(arr, tuple(range(lead)) + tuple(lead + i for i in inv))


def make_context(img: sitk.Image, size: int = 256) -> SliceContext:
    """The geometry part of ``to_model_slices`` (no pixels touched)."""
    if not isinstance(img, sitk.Image) or img.GetDimension() != 3:
        raise InputError("expected a 3D SimpleITK image")
    if int(size) < 8:
        raise InputError(f"model slice size must be at least 8, got {size}")
    perm, flips = _orientation(img)
    orig_shape = tuple(reversed(img.GetSize()))
    canon_shape = tuple(orig_shape[p] for p in perm)
    sp_zyx = tuple(reversed(img.GetSpacing()))
    canon_spacing = tuple(float(sp_zyx[p]) for p in perm)
    _, h, w = canon_shape
    _, sy, sx = canon_spacing
    fov = max(h * sy, w * sx)  # square physical field of view keeps the in-plane aspect
    hp = max(h, int(round(fov / sy)))
    wp = max(w, int(round(fov / sx)))
    top, left = (hp - h) // 2, (wp - w) // 2
    pad = (top, hp - h - top, left, wp - w - left)
    return SliceContext(int(size), orig_shape, perm, flips, canon_shape, canon_spacing, pad,
                        img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _resize(t, hw, mode):
    import torch.nn.functional as F

    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    if mode == "nearest":
        return F.interpolate(t, size=hw, mode="nearest-exact")
    shrink = hw[0] < t.shape[-2] or hw[1] < t.shape[-1]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=shrink)


def _canon_to_slices(canon: np.ndarray, ctx: SliceContext, fill: float, mode: str, chunk: int = 32):
    import torch

    top, bottom, left, right = ctx.pad
    out = np.empty((canon.shape[0], 1, ctx.size, ctx.size), dtype=np.float32)
    for z0 in range(0, canon.shape[0], chunk):
        part = np.pad(canon[z0:z0 + chunk], ((0, 0), (top, bottom), (left, right)), constant_values=fill)
        t = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))[:, None]
        out[z0:z0 + chunk] = _resize(t, (ctx.size, ctx.size), mode).numpy()
    return out


def to_model_slices(img: sitk.Image, size: int = 256):
    """Return ``(x, ctx)``: x is float32 [D, 1, size, size] in [0, 1] (axial LPS slices, lung window)."""
    ctx = make_context(img, size)
    canon = _to_canonical(sitk.GetArrayViewFromImage(img), ctx.perm, ctx.flips)
    x = _canon_to_slices(window(canon), ctx, fill=0.0, mode="bilinear")
    return np.clip(x, 0.0, 1.0, out=x), ctx


def label_to_model_slices(label_img: sitk.Image, ctx_or_size=256) -> np.ndarray:
    """Resample a label map like ``to_model_slices`` (nearest neighbour); uint8 [D, size, size]."""
    if isinstance(ctx_or_size, SliceContext):
        ctx = ctx_or_size
        if tuple(reversed(label_img.GetSize())) != tuple(ctx.orig_shape):
            raise InputError(f"label size {label_img.GetSize()} does not match the image size "
                             f"{tuple(reversed(ctx.orig_shape))}")
    else:
        ctx = make_context(label_img, int(ctx_or_size))
    canon = _to_canonical(sitk.GetArrayViewFromImage(label_img), ctx.perm, ctx.flips)
    out = _canon_to_slices(canon, ctx, fill=0.0, mode="nearest")
    return np.rint(out[:, 0]).astype(np.uint8)


def from_model_slices(prob, ctx: SliceContext, chunk: int = 16) -> np.ndarray:
    """Bring model outputs [D, C, S, S] (or [D, S, S]) back to float32 [C, z, y, x] on the original grid."""
    import torch

    p = prob.detach().cpu().numpy() if hasattr(prob, "detach") else np.asarray(prob)
    if p.ndim == 3:
        p = p[:, None]
    d = ctx.canon_shape[0]
    if p.ndim != 4 or p.shape[0] != d or p.shape[2:] != (ctx.size, ctx.size):
        raise InputError(f"model output shape {p.shape} does not match [D={d}, C, {ctx.size}, {ctx.size}]")
    top, bottom, left, right = ctx.pad
    _, h, w = ctx.canon_shape
    hp, wp = h + top + bottom, w + left + right
    canon = np.empty((p.shape[1], d, h, w), dtype=np.float32)
    for z0 in range(0, d, chunk):
        t = torch.from_numpy(np.ascontiguousarray(p[z0:z0 + chunk], dtype=np.float32))
        big = _resize(t, (hp, wp), "bilinear").numpy()
        canon[:, z0:z0 + chunk] = big[:, :, top:top + h, left:left + w].transpose(1, 0, 2, 3)
    return np.ascontiguousarray(_from_canonical(canon, ctx.perm, ctx.flips))


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
