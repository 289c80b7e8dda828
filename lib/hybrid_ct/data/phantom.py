"""Synthetic chest-CT phantoms in Hounsfield units with exact lung / infection masks.

Geometry is built in patient millimetres (LPS: +x patient left, +y posterior, +z superior), so any
array shape gives the same anatomy. Labels: 0 background, 1 lung (non-infected), 2 infection (always
inside the lung). Deterministic per seed; everything is vectorised numpy.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import SimpleITK as sitk

from hybrid_ct.errors import InputError

DEFAULT_SHAPE = (48, 192, 192)
FOV_MM = (240.0, 350.0, 350.0)  # (z, y, x) extent used when no spacing is given


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _tubes(vol, z, yy, xx, tubes, value, within=None):
    """Paint vertical-ish tubes: each is (z0, z1, (y0, x0), (y1, x1), radius); per-slice disks."""
    for z0, z1, (y0, x0), (y1, x1), r in tubes:
        ks = np.nonzero((z >= min(z0, z1)) & (z <= max(z0, z1)))[0]
        if ks.size == 0:
            continue
        t = (z[ks] - z0) / (z1 - z0)
        cy = (y0 + t * (y1 - y0))[:, None, None]
        cx = (x0 + t * (x1 - x0))[:, None, None]
        disk = (yy[None] - cy) ** 2 + (xx[None] - cx) ** 2 <= r * r
        if within is not None:
            disk &= within[ks]
        sub = vol[ks]
        sub[disk] = value
        vol[ks] = sub


def make_phantom(seed, shape=DEFAULT_SHAPE, spacing=None, positive=None, table=False):
    """Return ``(image, label, info)``: float32 HU image, uint8 label, and
    ``{"positive", "n_lesions", "burden_pct", "seed"}``.

    ``shape`` and ``spacing`` are (z, y, x), spacing in mm (default: a 240 x 350 x 350 mm field of
    view); ``positive=None`` draws it (2/3 positive); ``table`` adds a patient table under the back."""
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"phantom shape must be 3 positive sizes (z, y, x), got {shape}")
    d, h, w = (int(s) for s in shape)
    if spacing is None:
        spacing = (FOV_MM[0] / d, FOV_MM[1] / h, FOV_MM[2] / w)
    sz, sy, sx = (float(s) for s in spacing)
    if min(sz, sy, sx) <= 0:
        raise InputError(f"phantom spacing must be positive, got {spacing}")
    rng = np.random.default_rng(seed)
    if positive is None:
        positive = bool(rng.random() < 2 / 3)

    z = ((np.arange(d) - (d - 1) / 2) * sz).astype(np.float32)
    y = ((np.arange(h) - (h - 1) / 2) * sy).astype(np.float32)[:, None]
    x = ((np.arange(w) - (w - 1) / 2) * sx).astype(np.float32)[None, :]
    zz = z[:, None, None]

    # Body: an ellipse slightly narrower towards the apex, fat layer under the skin.
    bx, by = rng.uniform(140, 165), rng.uniform(100, 118)
    taper = 1.0 - 0.12 * np.clip(zz / (FOV_MM[0] / 2), 0, 1)
    body_e = _ellipse(y[None], x[None], 0.0, 0.0, by * taper, bx * taper)
    body = body_e <= 1.0
    fat_t = rng.uniform(8, 18)
    inner = _ellipse(y[None], x[None], 0.0, 0.0, by * taper - fat_t, bx * taper - fat_t) <= 1.0
    vol = np.full((d, h, w), -1000.0, dtype=np.float32)
    vol[body] = -100.0
    vol[inner] = 40.0

    # Lungs: ellipsoids above a domed diaphragm, the heart carved out of the left one.
    lz0, lz1 = -FOV_MM[0] * rng.uniform(0.36, 0.44), FOV_MM[0] * rng.uniform(0.42, 0.5)
    lzc, lhz = (lz0 + lz1) / 2, (lz1 - lz0) / 2 * 1.05
    lungs = np.zeros((d, h, w), dtype=bool)
    for side in (-1, 1):  # -1 patient right (-x), +1 patient left (+x)
        cx = side * bx * rng.uniform(0.42, 0.48)
        rx, ry = bx * rng.uniform(0.3, 0.34), by * rng.uniform(0.68, 0.76)
        prof = np.sqrt(np.clip(1 - ((zz - lzc) / lhz) ** 2, 0, None))  # ellipsoidal cross-section
        e = _ellipse(y[None], x[None], by * 0.08, cx, ry * prof + 1e-6, rx * prof + 1e-6)
        dome = lz0 + 35.0 * np.clip(1 - ((x[None] - cx) / rx) ** 2 - (y[None] / ry) ** 2, 0, 1)
        lungs |= (e <= 1.0) & (zz >= dome) & (zz <= lz1)
    lungs &= inner & (np.abs(x) > 16.0)[None]  # mediastinum keeps the two lungs apart
    hz = lz0 + (lz1 - lz0) * 0.45
    heart = (_ellipse(y[None], x[None], -by * 0.3, bx * 0.12, by * 0.42, bx * 0.3)
             + ((zz - lz0 - 20) / ((hz - lz0) + 25)) ** 2) <= 1.0
    lungs &= ~heart
    noise = rng.standard_normal((d, h, w), dtype=np.float32)
    vol[lungs] = -850.0 + 25.0 * noise[lungs]
    vol[heart & inner] = 40.0

    # Airways: trachea down to the carina, two main bronchi into the lungs.
    carina = lzc + rng.uniform(-10, 15)
    ty = -by * 0.25
    _tubes(vol, z, y, x, [(lz1 + 40, carina, (ty, 0.0), (ty, 0.0), 8.0)], -1000.0)
    bronchi = [(carina + 2, carina - 45, (ty, 0.0), (ty + 10, s * bx * 0.38), 5.5) for s in (-1, 1)]
    _tubes(vol, z, y, x, bronchi, -1000.0)

    # Vessels: tubes fanning out from each hilum, only inside the lungs.
    vessels = []
    for s in (-1, 1):
        for _ in range(int(rng.integers(6, 11))):
            zt = rng.uniform(lz0 + 5, lz1 - 10)
            tx, tyy = s * bx * rng.uniform(0.2, 0.7), by * rng.uniform(-0.5, 0.6)
            vessels.append((carina, zt, (ty + 10, s * bx * 0.3), (tyy, tx), rng.uniform(1.5, 4.0)))
    _tubes(vol, z, y, x, vessels, 40.0, within=lungs)

    # Spine (vertebral body + canal) and ribs.
    vy, vr = by * 0.42, rng.uniform(13, 17)
    vert = (y - vy) ** 2 + x ** 2 <= vr * vr
    canal = (y - (vy + vr + 6)) ** 2 + x ** 2 <= 49.0
    vol[:, vert] = 400.0
    vol[:, ((y - vy) ** 2 + x ** 2 <= vr * vr) & ((y - vy) ** 2 + x ** 2 >= (vr - 3) ** 2)] = 700.0
    vol[:, canal] = 20.0
    lungs &= ~(vert | canal)[None]
    ang = np.arctan2(y, x)[None]
    band = (body_e <= (1 - (fat_t - 2) / bx) ** 2) & (body_e >= (1 - (fat_t + 6) / bx) ** 2)
    ribs = band & (np.cos(2 * np.pi * (zz + 12.0 * np.abs(np.sin(ang))) / 28.0) > 0.55)
    ribs &= np.abs(x[None]) > 25.0  # no ribs over the sternum
    vol[ribs & ~lungs] = 700.0

    if table:
        vol[(y[None] > by + 12) & (y[None] < by + 22) & (np.abs(x[None]) < bx * 1.1) & (vol < -500)] = 150.0

    # Infection: irregular blobs inside the lungs, ground glass (soft edge) or consolidation.
    label = lungs.astype(np.uint8)
    n_lesions = 0
    if positive:
        idx = np.flatnonzero(lungs)
        if idx.size == 0:
            raise InputError(f"phantom shape {shape} is too small to hold lungs for a positive case")
        want = int(rng.integers(1, 11))
        for _ in range(4 * want):
            if n_lesions >= want:
                break
            n_lesions += _add_lesion(vol, label, lungs, idx, rng, (sz, sy, sx))
    noise *= 15.0
    noise[lungs] *= 0.4  # lungs already carry their own texture
    vol += noise

    lung_n = int((label > 0).sum())
    burden = 100.0 * float((label == 2).sum()) / lung_n if lung_n else 0.0
    info = {"positive": bool(positive), "n_lesions": int(n_lesions), "burden_pct": burden, "seed": seed}

    origin = (-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, -(d - 1) / 2 * sz)
    img = sitk.GetImageFromArray(vol)
    lab = sitk.GetImageFromArray(label)
    for im in (img, lab):
        im.SetSpacing((sx, sy, sz))
        im.SetOrigin(origin)
    return img, lab, info


def _add_lesion(vol, label, lungs, idx, rng, spacing) -> int:
    """Paint one lesion around a random lung voxel; return 1 if it labelled any voxel."""
    sz, sy, sx = spacing
    c = np.unravel_index(idx[rng.integers(idx.size)], lungs.shape)
    radii = rng.uniform(4, 45) * rng.uniform(0.6, 1.0, size=3)
    radii[0] = max(radii[0], sz * 0.8)
    ggo = rng.random() < 0.65
    hu = rng.uniform(-600, -300) if ggo else rng.uniform(-100, 40)
    edge = 0.25 if ggo else 0.06
    half = np.ceil(radii * 1.6 / np.array([sz, sy, sx])).astype(int) + 1
    sl = tuple(slice(max(ci - hi, 0), min(ci + hi + 1, n)) for ci, hi, n in zip(c, half, lungs.shape))
    gz, gy, gx = np.ogrid[sl[0], sl[1], sl[2]]
    dz, dy, dx = (gz - c[0]) * sz / radii[0], (gy - c[1]) * sy / radii[1], (gx - c[2]) * sx / radii[2]
    r = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
    # Irregular outline: a few random low-order lobes on the radius.
    theta, phi = np.arctan2(dy, dx), np.arctan2(dz, np.sqrt(dx ** 2 + dy ** 2) + 1e-9)
    for _ in range(3):
        k, l_, a, p = rng.integers(1, 5), rng.integers(0, 3), rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi)
        r = r * (1 + a * np.sin(k * theta + p) * np.cos(l_ * phi))
    wgt = 1.0 / (1.0 + np.exp((r - 1.0) / edge))  # 0.5 on the outline
    inside = lungs[sl]
    sub = vol[sl]
    blended = sub + (hu - sub) * wgt
    np.copyto(sub, np.maximum(sub, blended).astype(np.float32), where=inside)
    hit = inside & (wgt > 0.5)
    label[sl][hit] = 2
    return int(hit.any())


def write_phantom_set(out_dir, n=20, seed=0, shape=DEFAULT_SHAPE, spacing=None, with_labels=True):
    """Write ``n`` phantoms as a MONAI Label local datastore; return the image paths.

    Images ``<out_dir>/<id>.nii.gz`` (int16 HU), labels ``<out_dir>/labels/final/<id>.nii.gz`` and
    ``<out_dir>/phantoms.csv`` (id, positive, burden_pct, n_lesions, seed). About 2/3 are positive.
    """
    if int(n) < 1:
        raise InputError(f"number of phantoms must be at least 1, got {n}")
    n = int(n)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2 ** 31 - 1, size=n)
    positives = np.zeros(n, dtype=bool)
    positives[: int(round(n * 2 / 3))] = True
    rng.shuffle(positives)
    os.makedirs(out_dir, exist_ok=True)
    if with_labels:
        os.makedirs(os.path.join(out_dir, "labels", "final"), exist_ok=True)
    paths, rows = [], []
    for i in range(n):
        cid = f"phantom_{i:03d}"
        img, lab, info = make_phantom(int(seeds[i]), shape, spacing, bool(positives[i]))
        path = os.path.join(out_dir, f"{cid}.nii.gz")
        sitk.WriteImage(sitk.Cast(sitk.Round(sitk.Clamp(img, sitk.sitkFloat32, -1024, 3071)), sitk.sitkInt16), path)
        if with_labels:
            sitk.WriteImage(lab, os.path.join(out_dir, "labels", "final", f"{cid}.nii.gz"))
        paths.append(path)
        rows.append((cid, int(info["positive"]), f"{info['burden_pct']:.4f}", info["n_lesions"], int(seeds[i])))
    with open(os.path.join(out_dir, "phantoms.csv"), "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(("id", "positive", "burden_pct", "n_lesions", "seed"))
        wr.writerows(rows)
    return paths
