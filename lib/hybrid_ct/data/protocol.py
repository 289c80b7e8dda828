"""Scan-protocol variation: the same lungs as another scanner or another breath would show them.

The shipped model learned "denser than usual lung = infection": an expiration, free-breathing, low-dose or
soft-kernel scan lights up as infection. Two uses of the same operations:

- ``protocol_slice``: on the fly in training, on a model-space slice of an HU source ([0, 1] on the network
  window): each of these with its own probability -- the whole parenchyma denser by +50..+200 HU
  (inspiration level; needs the lung mask), a soft kernel (Gaussian blur) or a sharp one (unsharp mask), thick
  slices (partial volume along z: the slice mixed with its neighbours CONTEXT_MM below and above where the
  slice set has them, else an in-plane blur as an approximation), low-dose noise (correlated Gaussian noise,
  20-60 HU) and contrast (soft tissue and blood, -50..+100 HU, brighter by up to 150 HU: contrast medium);
- ``variant``: named, fixed variants of a 3D HU volume for the robustness benchmark and the tests
  (``VARIANTS``: denser +100 / +200 HU, a smooth kernel, 5 mm slices, low dose), deterministic.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from hybrid_ct.data.lesions import to_hu, to_window

VARIANTS = ("dense100", "dense200", "smooth", "thick5mm", "lowdose")
PARENCHYMA_MAX_HU = -400.0  # what "the parenchyma" is when it is shifted: lung voxels below this (not vessels)


def denser(hu: np.ndarray, lung: np.ndarray, shift_hu: float, spacing=None) -> np.ndarray:
    """The parenchyma (lung voxels below ``PARENCHYMA_MAX_HU``) ``shift_hu`` denser, with a soft edge at the
    pleura (an expiration scan: less air per voxel; vessels and walls stay where they are)."""
    lung = np.asarray(lung).astype(bool)
    sp = np.asarray(spacing if spacing is not None else (1.0,) * hu.ndim, float)
    w = ndimage.gaussian_filter(lung.astype(np.float32), np.maximum(1.0 / sp, 0.5))
    soft = np.clip((PARENCHYMA_MAX_HU + 100.0 - hu) / 200.0, 0.0, 1.0)  # fades out towards vessels
    return (hu + shift_hu * w * soft).astype(np.float32)


def soft_kernel(hu: np.ndarray, sigma_mm: float, spacing) -> np.ndarray:
    sp = np.asarray(spacing, float)
    sig = [0.0] * (hu.ndim - 2) + list(sigma_mm / sp[-2:])  # in-plane only
    return ndimage.gaussian_filter(hu.astype(np.float32), sig)


def sharp_kernel(hu: np.ndarray, amount: float, spacing) -> np.ndarray:
    blur = soft_kernel(hu, 1.0 * float(np.asarray(spacing)[-1]), spacing)
    return (hu + amount * (hu - blur)).astype(np.float32)


def noise(hu: np.ndarray, sd_hu: float, rng, spacing=None) -> np.ndarray:
    n = rng.standard_normal(hu.shape).astype(np.float32)
    n = ndimage.gaussian_filter(n, [0.0] * (hu.ndim - 2) + [0.6, 0.6])  # CT noise is correlated over a pixel
    n *= sd_hu / max(float(n.std()), 1e-6)
    return (hu + n).astype(np.float32)


def contrast(hu: np.ndarray, add_hu: float) -> np.ndarray:
    soft = np.clip(1.0 - np.abs(hu - 25.0) / 100.0, 0.0, 1.0)  # soft tissue and blood around 25 HU
    return (hu + add_hu * soft).astype(np.float32)


def thick_slices(hu: np.ndarray, spacing_zyx, thickness_mm: float) -> np.ndarray:
    """A 3D volume as if reconstructed with ``thickness_mm`` slices (box average along z, same grid)."""
    dz = float(spacing_zyx[0])
    n = max(int(round(thickness_mm / dz)), 1)
    return ndimage.uniform_filter1d(hu.astype(np.float32), n, axis=0, mode="nearest") if n > 1 else hu


def protocol_slice(x01: np.ndarray, lung: np.ndarray | None, rng: np.random.Generator,
                   neighbours: np.ndarray | None = None, px_mm: float = 350.0 / 128) -> np.ndarray:
    """One model-space slice ``[C, S, S]`` or ``[S, S]`` in [0, 1] (HU source) under a random protocol.
    ``lung`` [S, S] bool or None (then the density shift is skipped); ``neighbours`` [2, S, S] in [0, 1]: the
    slices CONTEXT_MM below / above (thick slices from them) or None (an in-plane blur instead)."""
    x = np.asarray(x01, np.float32)
    hu = to_hu(x)
    sp = (px_mm, px_mm)
    if rng.random() < 0.5:  # slice thickness 1-5 mm
        w = float(rng.uniform(0.0, 0.3))
        if neighbours is not None:
            hu = (1 - 2 * w) * hu + w * to_hu(np.asarray(neighbours, np.float32)).sum(0)
        else:
            hu = soft_kernel(hu, w * 2.0 * px_mm, sp)
    if lung is not None and np.asarray(lung).any() and rng.random() < 0.6:  # inspiration level
        hu = denser(hu, np.broadcast_to(np.asarray(lung).astype(bool), hu.shape), float(rng.uniform(50, 200)), (1.0,) * (hu.ndim - 2) + sp)
    k = rng.random()
    if k < 0.3:  # soft kernel
        hu = soft_kernel(hu, float(rng.uniform(0.5, 1.5)) * px_mm, sp)
    elif k < 0.5:  # sharp kernel
        hu = sharp_kernel(hu, float(rng.uniform(0.3, 1.0)), sp)
    if rng.random() < 0.4:  # low dose
        hu = noise(hu, float(rng.uniform(20, 60)), rng)
    if rng.random() < 0.3:  # contrast medium
        hu = contrast(hu, float(rng.uniform(0, 150)))
    return to_window(hu)


def variant(image: sitk.Image, name: str, lung: np.ndarray | None = None, seed: int = 0) -> sitk.Image:
    """A named protocol variant (``VARIANTS``) of an HU volume; ``lung`` [z, y, x] bool (the denser variants
    need it: e.g. the shipped model's own lung outline, or an expert contour)."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    sp = image.GetSpacing()[::-1]  # z, y, x
    if name in ("dense100", "dense200"):
        if lung is None:
            raise ValueError(f"variant {name} needs the lung mask")
        out = denser(hu, lung, 100.0 if name == "dense100" else 200.0, sp)
    elif name == "smooth":
        out = soft_kernel(hu, 1.5, sp)
    elif name == "thick5mm":
        out = soft_kernel(thick_slices(hu, sp, 5.0), 0.7, sp)
    elif name == "lowdose":
        out = noise(hu, 50.0, np.random.default_rng(seed))
    else:
        raise ValueError(f"unknown variant {name!r}: choose from {VARIANTS}")
    img = sitk.GetImageFromArray(out.astype(np.float32))
    img.CopyInformation(image)
    return img
