"""COVID-like lesions synthesised inside real, infection-free lungs, with exact masks.

The infection head has expert masks for 50 cropped 8-bit pictures and the phantoms only; the whole HU scans
(LUNG1-001, the imlab volumes, the clean slices of the COVID-CT-MD scans) have lungs but no infection. Here
lesions are drawn into those lungs on the fly from a seed, so the network sees infection in real anatomy
(the idea of NormNet, Yao et al., IEEE TMI 2021: lesion segmentation learned from healthy CTs with
synthesised lesions). What is drawn, and where:

- **kinds** (``KINDS``): ground glass (``ggo``: the parenchyma raised towards -750..-300 HU by an additive
  blend, so vessels and bronchi stay visible through it), consolidation (``consolidation``: -100..+60 HU,
  with air bronchograms: branching lines of air left inside), crazy paving (``crazy_paving``: ground glass +
  a reticular network of thickened septa) and band-like / organising opacities (``band``: a curved band
  parallel to the pleura, -350..-50 HU);
- **distribution**: foci are drawn with a weight that favours the periphery (within ~15 mm of the pleura),
  the posterior lung and, in 3D, the lower lung; several foci (1-8) in both lungs; each focus from 5 mm
  nodular ground glass up to lobar size;
- **borders**: each focus is an ellipsoid whose occupancy is perturbed by a smoothed noise field (irregular
  border); the lesion's strength ``alpha`` ramps over about one pixel (partial volume). The **mask is exact**:
  the voxels of the lung with ``alpha >= 0.5``; voxels outside the lung are never changed.

Works in N dimensions with a spacing per axis: on the model-space slices the trainer sees (``lesion_slice``:
a 2D slice in [0, 1] on the network window ``processing.grid.WINDOW_HU`` and its lung mask) and on 3D HU
volumes (``synthesize``) for test and evaluation variants. Deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hybrid_ct.processing.grid import WINDOW_HU

KINDS = ("ggo", "consolidation", "crazy_paving", "band")
KIND_WEIGHTS = (0.5, 0.2, 0.15, 0.15)  # ground glass is the commonest finding of COVID-19 pneumonia
GGO_HU = (-750.0, -300.0)
CONSOLIDATION_HU = (-100.0, 60.0)
BAND_HU = (-350.0, -50.0)
AIR_HU = -900.0  # air bronchograms
RADIUS_MM = (2.5, 40.0)  # 5 mm nodular ground glass ... large confluent foci
LOBAR_MM = (40.0, 70.0)  # now and then a lobar one
LOBAR_SHARE = 0.1
PERIPHERAL_MM = 15.0  # the weight of a focus centre falls off as exp(-distance to the pleura / this)
MODEL_SLICE_MM = 350.0  # the width a model slice spans (the square field of view of the body): ~2.7 mm/pixel at 128


@dataclass
class Focus:
    kind: str
    centre: tuple  # voxel index
    radius_mm: float
    density_hu: float
    voxels: int = 0


def _smooth_noise(rng, shape, sigma_px) -> np.ndarray:
    """Gaussian noise smoothed to a correlation length of ``sigma_px`` (per axis), scaled to unit std."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="reflect")
    sd = float(n.std())
    return n / sd if sd > 0 else n


def _weights(lung: np.ndarray, spacing, inferior_axis: int | None) -> np.ndarray:
    """Where a focus centre falls: peripheral (near the pleura), posterior (higher index along the second-last
    axis: anterior is up in model space and in LPS arrays), inferior (``inferior_axis``: index 0 is the foot)."""
    d = ndimage.distance_transform_edt(lung, sampling=spacing)
    w = np.exp(-d / PERIPHERAL_MM) * lung
    idx = np.nonzero(lung)
    rows = idx[-2]
    lo, hi = rows.min(), rows.max()
    post = np.zeros(lung.shape[-2], np.float32)
    post[lo:hi + 1] = 0.5 + np.linspace(0.0, 1.0, hi - lo + 1)
    shape = [1] * lung.ndim
    shape[-2] = lung.shape[-2]
    w = w * post.reshape(shape)
    if inferior_axis is not None and lung.ndim == 3:
        zs = idx[inferior_axis]
        z0, z1 = zs.min(), zs.max()
        low = np.zeros(lung.shape[inferior_axis], np.float32)
        low[z0:z1 + 1] = 1.5 - np.linspace(0.0, 1.0, z1 - z0 + 1)
        shape = [1] * 3
        shape[inferior_axis] = lung.shape[inferior_axis]
        w = w * low.reshape(shape)
    return w.astype(np.float64)


def _sides(lung: np.ndarray) -> list:
    """The lung split into its left and right halves (columns of the lung's bounding box, last axis)."""
    cols = np.nonzero(lung.any(axis=tuple(range(lung.ndim - 1))))[0]
    mid = (cols.min() + cols.max() + 1) // 2
    left, right = lung.copy(), lung.copy()
    left[..., mid:] = False
    right[..., :mid] = False
    return [s for s in (left, right) if s.any()]


def _parenchyma(hu: np.ndarray, lung: np.ndarray) -> float:
    """The lung's parenchymal density: median HU of the lung below -500 HU (vessels left out)."""
    v = hu[lung]
    v = v[v < -500]
    return float(np.median(v)) if v.size else -850.0


def _focus(hu, lung, pleura_mm, rng, spacing, centre, kind, radius, density, parenchyma):
    """Draw one focus into ``hu`` (in place) and return its mask (on the whole grid)."""
    sp = np.asarray(spacing, float)
    half = np.ceil(1.6 * radius / sp + 2).astype(int)
    lo = np.maximum(np.asarray(centre) - half, 0)
    hi = np.minimum(np.asarray(centre) + half + 1, hu.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_lung = lung[box]
    grids = np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, sp)], indexing="ij")
    axes = radius * rng.uniform(0.6, 1.4, size=len(sp))  # an irregular ellipsoid
    rot = rng.uniform(0, np.pi)
    if len(grids) >= 2:  # turned in the axial plane
        gy, gx = grids[-2], grids[-1]
        grids[-2], grids[-1] = gy * np.cos(rot) - gx * np.sin(rot), gy * np.sin(rot) + gx * np.cos(rot)
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, axes)))
    shape = sub_lung.shape
    sigma = np.maximum(radius / 2.5 / sp, 0.7)
    occ = 1.0 - r + rng.uniform(0.3, 0.6) * _smooth_noise(rng, shape, sigma)
    occ += rng.uniform(0.1, 0.3) * _smooth_noise(rng, shape, np.maximum(sigma / 3.0, 0.7))  # a ragged border
    if kind == "band":  # a curved band parallel to the pleura, a few mm thick
        d0, width = rng.uniform(2.0, 12.0), rng.uniform(3.0, 8.0)
        band = 1.0 - np.abs(pleura_mm[box] - d0) / (width / 2)
        occ = np.minimum(occ + 0.5, band + 0.15 * _smooth_noise(rng, shape, np.maximum(2.0 / sp, 0.7)))
    mask = (occ >= 0) & sub_lung
    if not mask.any():
        return np.zeros(hu.shape, bool)
    # partial volume: the mask smoothed over about a pixel, held >= 0.5 inside and < 0.5 outside (exact mask)
    soft = ndimage.gaussian_filter(mask.astype(np.float32), float(rng.uniform(0.4, 0.8)) * float(sp[-1]) / sp)
    alpha = np.where(mask, np.maximum(soft, 0.5), np.minimum(soft, 0.49)) * sub_lung
    sub = hu[box]
    texture = _smooth_noise(rng, shape, np.maximum(0.8 / sp, 0.5))
    core = np.clip(occ * rng.uniform(2.0, 4.0), 0.0, 1.0)  # 0 at the border, 1 inside: lesions fade outwards
    patchy = np.clip(1.0 + 0.3 * _smooth_noise(rng, shape, np.maximum(sigma / 1.5, 0.7)), 0.4, 1.5)
    if kind in ("ggo", "crazy_paving"):
        # additive blend: raise the parenchyma's background towards a target that fades towards the border and
        # varies in patches, keep what lies above it (vessels, fissures, bronchial walls) as much above it as it
        # was -- they stay visible
        target = np.minimum(parenchyma + (density - parenchyma) * (0.45 + 0.55 * core) * patchy, -150.0)
        bg = ndimage.gaussian_filter(np.minimum(sub, target), np.maximum(3.0 / sp, 1.0))
        delta = np.maximum(target - bg, 0.0) + 25.0 * texture
        delta = delta * np.clip((target + 200.0 - sub) / 400.0, 0.0, 1.0)  # vessels above it barely move
        new = sub + alpha * delta
        if kind == "crazy_paving":  # thickened interlobular septa: a polygonal network of lines
            cell = np.maximum(rng.uniform(3.0, 6.0) / sp, 1.0)
            net = np.abs(_smooth_noise(rng, shape, cell))
            lines = np.clip(1.0 - net / 0.25, 0.0, 1.0)
            new = new + alpha * lines * rng.uniform(150.0, 300.0)
    else:
        # consolidation / band: the parenchyma filled up to the target, with a ground-glass halo towards the
        # border (the mixed lesions of COVID-19) and patches; denser structures kept
        halo = float(rng.uniform(-650.0, -400.0))
        target = halo + (density - halo) * core + 60.0 * (patchy - 1.0) / 0.3 * 0.5 + 45.0 * texture
        new = sub + alpha * np.maximum(target - sub, 0.0)
        if kind == "consolidation" and radius >= 6.0:  # air bronchograms: branching lines of air
            tubes = np.abs(_smooth_noise(rng, shape, np.maximum(radius / 3.0 / sp, 1.0)))
            if len(sp) == 3:
                tubes = np.maximum(tubes, np.abs(_smooth_noise(rng, shape, np.maximum(radius / 3.0 / sp, 1.0))))
            air = (tubes < 0.08) & (alpha >= 0.9)
            new = np.where(air, AIR_HU + 40.0 * texture, new)
    hu[box] = np.where(sub_lung, new, sub)
    full = np.zeros(hu.shape, bool)
    full[box] = mask
    return full


def draw_foci(lung: np.ndarray, rng: np.random.Generator, spacing, parenchyma: float,
              n_foci: int | None = None, kinds=None, inferior_axis: int | None = None,
              radius_mm=RADIUS_MM) -> list:
    """Where and what: ``n_foci`` (default 1-8, most 1-4) Focus records, alternating between the two lungs."""
    n = int(n_foci) if n_foci is not None else int(min(1 + rng.poisson(1.8), 8))
    w = _weights(lung, spacing, inferior_axis)
    sides = _sides(lung)
    first = int(rng.integers(len(sides)))
    kinds = tuple(kinds) if kinds else KINDS
    kw = np.array([KIND_WEIGHTS[KINDS.index(k)] for k in kinds], float)
    out = []
    for i in range(n):
        side = sides[(first + i) % len(sides)]
        ws = (w * side).ravel()
        if ws.sum() <= 0:
            continue
        flat = int(rng.choice(ws.size, p=ws / ws.sum()))
        centre = tuple(int(c) for c in np.unravel_index(flat, lung.shape))
        kind = str(kinds[int(rng.choice(len(kinds), p=kw / kw.sum()))])
        if rng.random() < LOBAR_SHARE:
            radius = float(rng.uniform(*LOBAR_MM))
        else:
            radius = float(np.exp(rng.uniform(np.log(radius_mm[0]), np.log(radius_mm[1]))))
        lo_hu, hi_hu = {"ggo": GGO_HU, "crazy_paving": GGO_HU, "consolidation": CONSOLIDATION_HU, "band": BAND_HU}[kind]
        if kind in ("ggo", "crazy_paving"):  # the target lies above the parenchyma
            lo_hu = max(lo_hu, parenchyma + 100.0)
        out.append(Focus(kind, centre, radius, float(rng.uniform(lo_hu, hi_hu))))
    return out


def synthesize(hu: np.ndarray, lung: np.ndarray, seed, spacing=None, n_foci: int | None = None, kinds=None,
               inferior_axis: int | None = None, radius_mm=RADIUS_MM):
    """Lesions drawn into the lung of an HU array (2D or 3D, any spacing in mm per axis).

    -> ``(hu_out float32, mask bool, foci)``: ``mask`` is the exact lesion mask (inside ``lung``), ``hu_out``
    equals ``hu`` outside the lung. ``seed``: an int or a ``np.random.Generator``. ``inferior_axis``: the axis
    whose index 0 is the foot (3D: lower-lobe predominance)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    hu_out = np.array(hu, dtype=np.float32, copy=True)
    lung = np.asarray(lung).astype(bool)
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * hu_out.ndim))
    mask = np.zeros(lung.shape, bool)
    if lung.sum() < 8:
        return hu_out, mask, []
    parenchyma = _parenchyma(hu_out, lung)
    pleura_mm = ndimage.distance_transform_edt(lung, sampling=spacing).astype(np.float32)
    foci = draw_foci(lung, rng, spacing, parenchyma, n_foci, kinds, inferior_axis, radius_mm)
    for f in foci:
        m = _focus(hu_out, lung, pleura_mm, rng, spacing, f.centre, f.kind, f.radius_mm, f.density_hu, parenchyma)
        f.voxels = int(m.sum())
        mask |= m
    return hu_out, mask, foci


def to_hu(x01: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW_HU
    return lo + np.asarray(x01, np.float32) * np.float32(hi - lo)


def to_window(hu: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW_HU
    return np.clip((np.asarray(hu, np.float32) - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def lesion_slice(x01: np.ndarray, lung: np.ndarray, rng, px_mm: float | None = None, **kw):
    """A model-space slice (``[..., S, S]`` in [0, 1] on the network window; extra leading channels, e.g.
    the 2.5D input, all get the same lesion) and its lung mask ``[S, S]`` -> ``(x01 with lesions, mask uint8)``.
    ``px_mm``: the pixel size (default: a 350 mm wide field of view over S pixels)."""
    x = np.asarray(x01, np.float32)
    s = x.shape[-1]
    px = float(px_mm) if px_mm else MODEL_SLICE_MM / s
    lung = np.asarray(lung).astype(bool)
    flat = x.reshape((-1,) + x.shape[-2:])
    centre = flat[len(flat) // 2]
    hu = to_hu(centre)
    out, mask, _ = synthesize(hu, lung, rng, (px, px), **kw)
    delta = out - hu  # the same change to every channel (the neighbours of the 2.5D input)
    res = np.stack([to_window(to_hu(c) + delta) for c in flat]).reshape(x.shape)
    return res.astype(np.float32), mask.astype(np.uint8)
