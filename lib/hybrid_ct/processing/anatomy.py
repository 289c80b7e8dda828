"""Anatomically plausible lungs in 3D: what the network outlines as lung is kept only where a lung can be.

The network reads one slice at a time, so gas in the stomach or colon under the diaphragm and air under
the patient's back look like lung to it. In 3D they are told apart by where they lie: the lungs are the
large aerated organs of the thorax, each reaching from the apex down to the diaphragm. On a whole volume:

- the predicted lung that is aerated (< ``AIR_HU``) is eroded by ``ERODE_MM`` on a ``GRID_MM`` grid: this
  breaks the false bridges the network draws through the diaphragm, and leaves one core per organ;
- the **main lung** is the largest core; another large core is the **other lung** if it reaches into the
  upper half of the main lung's cranio-caudal extent (a lung reaches the apex, gas under a dome does not);
- a core lying mostly **below the lungs' floor** in its own cranio-caudal columns is gas under the
  diaphragm: it is dropped with the predicted lung around it (within ``ERODE_MM + gap_mm``) and whatever
  joins the lung only through it; predicted lung joined to the lungs elsewhere stays (thin aerated lung
  at the bases, dense infection, which has no aerated core);
- with a trusted body mask (it holds the main lung's core), predicted lung outside the body (table,
  blankets, air under the back) is dropped, and a core mostly outside it is never the other lung.
Infection is dropped with the lung it sits in (infection exists only inside lung). Directions come from
the image geometry (superior is +z in DICOM LPS), so any orientation works. Tried and withdrawn after
looking at the whole scans (docs/model_card.md): dropping whatever lies above the aerated top of its
column (it cut a posterior consolidation of P001) and plain erosion without the aerated re-join (it cut
the thin lung at the bases).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from hybrid_ct.processing.crop import box_offset, foreground_box, shifted_origin

GAP_MM = 3.0  # margin around the kept cores; the diaphragm and the organs below it are thicker
ERODE_MM = 4.0  # breaks false bridges of predicted lung through the diaphragm (thinner than 8 mm)
GRID_MM = 3.0  # in-plane grid of the rule
AIR_HU = -400.0  # aerated lung is below this; the diaphragm, liver and bowel wall are above
BODY_TRUSTED = 0.95  # a body mask holding 95 % of the main lung core outlines the whole chest
MIN_GAS_FRACTION = 0.002  # gas components smaller than this share of the main lung are left alone


def superior_extent(slices, spacing_xyz, direction, origin) -> tuple:
    """(min, max) of the physical superior coordinate (LPS z, mm) over a bounding box ``slices`` of an
    array in SimpleITK's [z, y, x] layout."""
    d = np.asarray(direction, float).reshape(3, 3)
    corners = np.array([[s.start, s.stop - 1] for s in slices])  # per array axis (z, y, x)
    zs = []
    for iz in corners[0]:
        for iy in corners[1]:
            for ix in corners[2]:
                idx = np.array([ix, iy, iz], float) * np.asarray(spacing_xyz, float)
                zs.append(origin[2] + d[2] @ idx)
    return min(zs), max(zs)


def plausible_lungs(label: np.ndarray, hu: np.ndarray, spacing_xyz, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                    origin=(0, 0, 0), body: np.ndarray | None = None, min_fraction: float = 0.05,
                    gap_mm: float = GAP_MM) -> np.ndarray:
    """``label`` [z, y, x] (0 background, 1 lung, 2 infection) of one whole volume -> the same map with
    what cannot be lung set to background (see the module docstring).

    The network's lung often reaches gas under the diaphragm through a thin false bridge, so the rule
    works on the lung eroded by ``ERODE_MM`` (which breaks such bridges), on a grid of about
    ``GRID_MM`` in-plane (cheap: the anatomy needs no sub-millimetre detail); the kept components are
    grown back by the erosion plus ``gap_mm``; predicted lung outside them is dropped unless it is thin
    aerated lung (< ``AIR_HU``, no core of its own) joined to the kept lung through aerated lung: the
    thin lung at the bases and along the chest wall, which erosion removes. Gas under the diaphragm is
    thick (it has a core of its own, which was not kept) and a false bridge through the diaphragm is
    soft tissue, not air.
    ``hu`` is the image in Hounsfield units, same [z, y, x] array layout as ``label``.

    Runs on the box of the predicted lung (``crop.foreground_box``, its in-plane start on the rule's
    grid, the origin moved to the box): the same result as on the whole volume, cheaper.
    """
    lung = label > 0
    if lung.shape[0] < 2:
        return label
    s = _stride(spacing_xyz)
    box = foreground_box(lung, margin=1, align=(1, s, s))
    if box is None:
        return label
    use_body = body is not None and body.shape == lung.shape
    part = label[box]
    sub = _plausible(part, lung[box], hu[box], spacing_xyz, direction,
                     shifted_origin(origin, spacing_xyz, direction, box_offset(box)),
                     body[box] if use_body else None, min_fraction, gap_mm)
    if sub is part:
        return label
    out = label.copy()
    out[box] = sub
    return out


def _stride(spacing_xyz) -> int:
    return max(1, int(round(GRID_MM / float(spacing_xyz[0]))))


def _plausible(label, lung, hu, spacing_xyz, direction, origin, body, min_fraction, gap_mm):
    """``plausible_lungs`` on a box around the lung (``origin``: the box's own)."""
    s = _stride(spacing_xyz)
    grid = (float(spacing_xyz[0]) * s, float(spacing_xyz[1]) * s, float(spacing_xyz[2]))
    air = lung & (hu < AIR_HU)
    core = ndimage.binary_erosion(air[:, ::s, ::s], structure=_ball(grid, ERODE_MM))
    comp, n = ndimage.label(core)
    if n == 0:
        return label
    idx = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(core, comp, index=idx)
    main = int(np.argmax(sizes))
    # the body is trusted when it holds the main lung's core: the share of ALL predicted lung inside it
    # was the test before, and a large false lung outside (table air on LUNG1-001, ~12 % of the predicted
    # lung) made the body untrusted, so that very false lung stayed
    inside = np.ones(n, bool)
    trusted = False
    if body is not None:
        share = np.asarray(ndimage.mean(body[:, ::s, ::s], comp, index=idx))
        trusted = bool(share[main] >= BODY_TRUSTED)
        inside = share >= 0.5 if trusted else inside
    drop = lung & ~body if trusted else np.zeros_like(lung)  # outside the patient: table, blankets
    if n < 2:
        return _dropped(label, drop)
    boxes = ndimage.find_objects(comp)
    lo, hi = superior_extent(boxes[main], grid, direction, origin)
    upper_half = lo + 0.5 * (hi - lo)
    keep = np.zeros(n, bool)
    keep[main] = True
    for i in np.flatnonzero((sizes >= min_fraction * sizes[main]) & inside):
        if i != main and superior_extent(boxes[i], grid, direction, origin)[1] >= upper_half:
            keep[i] = True  # the other lung: it reaches up towards the apex
    lungs = np.isin(comp, idx[keep])
    sup, axis = _superior(comp.shape, grid, direction, origin)
    gas = _below_the_lungs(comp, idx, lungs, sup, axis) & ~keep & (sizes >= MIN_GAS_FRACTION * sizes[main])
    grow = _ball(grid, ERODE_MM + gap_mm)
    region = _full(ndimage.binary_dilation(lungs, structure=grow), s, lung.shape)
    if gas.any():
        # lung joined to the kept lung stays (thin aerated lung at the bases, dense infection, small
        # pieces), unless it lies at an air component under the lungs (gas under the diaphragm) or beyond
        rejected = _full(ndimage.binary_dilation(np.isin(comp, idx[gas]), structure=grow), s, lung.shape)
        drop |= lung & rejected & ~region
        parts, _ = ndimage.label(lung & ~rejected)
        joined = np.unique(parts[region & ~rejected & lung])
        drop |= lung & ~rejected & ~np.isin(parts, joined[joined > 0])
    return _dropped(label, drop)


def _dropped(label: np.ndarray, drop: np.ndarray) -> np.ndarray:
    if not drop.any():
        return label
    out = label.copy()
    out[drop] = 0
    return out


def _superior(shape, grid, direction, origin):
    """(physical superior coordinate of every voxel of a [z, y, x] grid, broadcastable; the array axis
    most aligned with the superior direction)."""
    d = np.asarray(direction, float).reshape(3, 3)
    axis = 2 - int(np.argmax(np.abs(d[2])))
    sup = origin[2] + sum(np.arange(shape[a]).reshape([-1 if b == a else 1 for b in range(3)])
                          * grid[2 - a] * d[2, 2 - a] for a in range(3))
    return np.broadcast_to(sup, shape), axis


def _below_the_lungs(comp, idx, lungs, sup, axis) -> np.ndarray:
    """Per component: do most of its voxels lie below the lowest lung voxel of their own cranio-caudal
    column (under the diaphragm)?"""
    floor = np.where(lungs, sup, np.inf).min(axis=axis, keepdims=True)
    below = (sup < floor) & np.isfinite(floor)
    return np.asarray(ndimage.mean(below, comp, index=idx)) >= 0.5


def _full(coarse: np.ndarray, s: int, shape) -> np.ndarray:
    """A mask of the coarse grid (in-plane stride ``s``) back on the full grid of ``shape``."""
    return coarse.repeat(s, axis=1).repeat(s, axis=2)[:, : shape[1], : shape[2]]


def _ball(spacing_xyz, radius_mm: float) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on a grid of ``spacing_xyz`` ([z, y, x] order)."""
    r = [max(1, int(np.floor(radius_mm / sp))) for sp in (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])]
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    return (zz * spacing_xyz[2]) ** 2 + (yy * spacing_xyz[1]) ** 2 + (xx * spacing_xyz[0]) ** 2 <= \
        max(radius_mm, max(spacing_xyz)) ** 2
