"""Pools of whole scans with hidden voxel truth for the active-learning campaign (bench_active_learning.py).

Kinds of scan (``Case.kind``):

- ``phantom``: ``hybrid_ct.data.phantom.make_phantom`` as it is (2/3 positive);
- ``lowdose``: a phantom with extra quantum noise (Gaussian, sigma 60-110 HU, lightly smoothed in-plane), as
  in a low-dose acquisition;
- ``thick``: a phantom built with twice the slices, then averaged in pairs (partial-volume blur across a
  slice twice as thick); the label is the upper slice of each pair;
- ``distractor``: an infection-FREE phantom with what a network confuses with infection: a gravity-dependent
  density gradient in the posterior lungs (up to +220 HU, "dependent atelectasis") and 2-4 dense
  calcified nodules (labelled lung, not infection);
- ``real``: real HU volumes with expert lung contours (``../shared/data``, read in place): the two imlab
  volumes (128x128x64) and NSCLC-Radiomics LUNG1-001 (lung_lr: right 1 / left 2 -> lung 1). No infection
  (label 0/1). Infection-free scans, so they measure lung Dice and false infection only.
- ``lesions``: the real scans above with COVID-like lesions drawn into their lungs by
  ``hybrid_ct.data.lesions.synthesize`` (exact masks, label 2; LUNG1-001's tumour and 10 mm around it left
  alone): the pool gets the pool's real scans with lesions, the test pool imlab id002 with lesions, so real
  anatomy with infection is both corrected and scored.

The phantoms' hardness is made here, not in ``hybrid_ct.data.phantom``, so that the campaign does not
change what the rest of the project trains on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHARED = Path(os.environ.get("HYBRID_CT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
REAL = {  # id: (image, lung mask) under ../shared/data
    "imlab_id001": ("lung3d_imlab/id001_image_hu.nii.gz", "lung3d_imlab/id001_lungmask.nii.gz"),
    "imlab_id002": ("lung3d_imlab/id002_image_hu.nii.gz", "lung3d_imlab/id002_lungmask.nii.gz"),
    "nsclc_lung1_001": ("volumes_hu/nsclc_lung1_001/image_hu.nii.gz", "volumes_hu/nsclc_lung1_001/lung_lr.nii.gz"),
}
TUMOUR = {"nsclc_lung1_001": "volumes_hu/nsclc_lung1_001/tumor_gtv_mask.nii.gz"}  # no lesion drawn into or near it
TUMOUR_MARGIN_MM = 10.0
PHANTOM_KINDS = ("phantom", "lowdose", "thick", "distractor")


@dataclass
class Case:
    id: str
    kind: str
    image: sitk.Image
    label: sitk.Image
    positive: bool
    info: dict = field(default_factory=dict)
    keep_out: np.ndarray | None = None  # [z, y, x] where no synthetic lesion may go (a tumour and its margin)


def _like(arr, ref: sitk.Image, spacing=None) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin(ref.GetOrigin())
    img.SetDirection(ref.GetDirection())
    img.SetSpacing(spacing or ref.GetSpacing())
    return img


def hard_phantom(kind: str, seed: int, shape, positive: bool) -> tuple:
    """One phantom of ``kind`` -> (image, label, info)."""
    from hybrid_ct.data.phantom import make_phantom

    rng = np.random.default_rng(seed + 7919)
    if kind == "thick":
        d, h, w = shape
        img, lab, info = make_phantom(seed, shape=(2 * d, h, w), positive=positive)
        a, la = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
        a = a.reshape(d, 2, h, w).mean(axis=1).astype(np.float32)
        la = la[::2].copy()
        sp = img.GetSpacing()
        return _like(a, img, (sp[0], sp[1], sp[2] * 2)), _like(la, lab, (sp[0], sp[1], sp[2] * 2)), info
    img, lab, info = make_phantom(seed, shape=shape, positive=positive if kind != "distractor" else False)
    a, la = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
    if kind == "lowdose":
        sigma = rng.uniform(60, 110)
        noise = rng.standard_normal(a.shape).astype(np.float32) * sigma
        noise = (noise + np.roll(noise, 1, axis=2) + np.roll(noise, 1, axis=1)) / np.sqrt(3)  # some correlation
        body = a > -900
        a = np.where(body, a + noise, a)
        info["noise_sigma_hu"] = round(float(sigma), 1)
    elif kind == "distractor":
        lungs = la > 0
        d, h, w = a.shape
        ys = np.nonzero(lungs.any(axis=(0, 2)))[0]
        if ys.size:
            y0, y1 = ys.min(), ys.max()
            t = np.clip((np.arange(h) - (y0 + 0.6 * (y1 - y0))) / max(0.4 * (y1 - y0), 1), 0, 1)  # posterior 40 %
            grad = (220.0 * t ** 1.5)[None, :, None].astype(np.float32)
            a = np.where(lungs, a + grad, a)
        idx = np.flatnonzero(lungs)
        zz, yy, xx = np.ogrid[:d, :h, :w]
        sp = img.GetSpacing()
        for _ in range(int(rng.integers(2, 5))):
            if idx.size == 0:
                break
            cz, cy, cx = np.unravel_index(idx[rng.integers(idx.size)], lungs.shape)
            r = rng.uniform(3, 6)  # mm
            ball = ((zz - cz) * sp[2]) ** 2 + ((yy - cy) * sp[1]) ** 2 + ((xx - cx) * sp[0]) ** 2 <= r * r
            a = np.where(ball & lungs, rng.uniform(150, 400), a)
        info["distractors"] = "dependent density + calcified nodules"
    return _like(a.astype(np.float32), img), _like(la.astype(np.uint8), lab), info


def phantom_cases(prefix: str, n: int, seed: int, shape, kinds=PHANTOM_KINDS) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        positive = kind != "distractor" and bool(rng.random() < 0.7)
        s = int(rng.integers(0, 2 ** 31 - 1))
        img, lab, info = hard_phantom(kind, s, shape, positive)
        positive = bool((sitk.GetArrayViewFromImage(lab) == 2).any())
        out.append(Case(f"{prefix}{i:02d}", kind, img, lab, positive, dict(info, seed=s)))
    return out


def real_case(name: str, max_slices: int = 0) -> Case | None:
    """A real HU volume with its expert lungs (label 0/1); None when ../shared/data lacks it. ``max_slices``:
    keep every k-th slice so that at most that many stay (a cheaper scan for a small campaign)."""
    img_p, lab_p = (SHARED / p for p in REAL[name])
    if not (img_p.is_file() and lab_p.is_file()):
        return None
    img, lab = sitk.ReadImage(str(img_p), sitk.sitkFloat32), sitk.ReadImage(str(lab_p))
    lab = sitk.Cast(lab > 0, sitk.sitkUInt8)
    lab.CopyInformation(img)
    keep_out = None
    if name in TUMOUR and (SHARED / TUMOUR[name]).is_file():
        t = sitk.ReadImage(str(SHARED / TUMOUR[name])) > 0
        t.CopyInformation(img)
        margin = [max(1, int(round(TUMOUR_MARGIN_MM / s))) for s in img.GetSpacing()]
        keep_out = sitk.BinaryDilate(sitk.Cast(t, sitk.sitkUInt8), margin)
    if max_slices and img.GetDepth() > max_slices:
        k = int(np.ceil(img.GetDepth() / max_slices))
        img, lab = img[:, :, ::k], lab[:, :, ::k]
        keep_out = keep_out[:, :, ::k] if keep_out is not None else None
    return Case(name, "real", img, lab, False, {"source": str(img_p.relative_to(SHARED))},
                sitk.GetArrayFromImage(keep_out) > 0 if keep_out is not None else None)


def lesion_cases(cases: list, seed: int) -> list:
    """Each case with lesions drawn into its lung (``hybrid_ct.data.lesions.synthesize``, seeded ``seed + k``;
    lower-lobe predominance from the image's own superior direction) -> label 2 where a lesion is."""
    from hybrid_ct.data.lesions import synthesize

    out = []
    for k, c in enumerate(cases):
        hu = sitk.GetArrayFromImage(c.image).astype(np.float32)
        lab = sitk.GetArrayFromImage(c.label)
        lung = lab > 0
        if c.keep_out is not None:
            lung &= ~c.keep_out
        up = float(np.asarray(c.image.GetDirection()).reshape(3, 3)[2, 2])  # +z in LPS is superior
        hu2, mask, foci = synthesize(hu, lung, seed + k, spacing=c.image.GetSpacing()[::-1],
                                     inferior_axis=0 if up >= 0 else None)
        lab2 = lab.copy()
        lab2[mask] = 2
        out.append(Case(c.id + "_lesions", "lesions", _like(hu2, c.image), _like(lab2.astype(np.uint8), c.label),
                        bool(mask.any()), dict(c.info, lesions_seed=seed + k, lesions=len(foci),
                                               lesion_ml=round(float(mask.sum() * np.prod(c.image.GetSpacing()))
                                                               / 1000.0, 1))))
    return out


POOL_REAL, TEST_REAL = ("nsclc_lung1_001", "imlab_id001"), ("imlab_id002",)


def build_pools(seed: int, n_pool: int, n_test: int, shape, real: bool = True, real_max_slices: int = 48,
                pool_real=POOL_REAL, test_real=TEST_REAL) -> dict:
    """-> {"pool": [Case], "test": [Case], "notes": [...]}: the same for every strategy of a seed.
    Real scans (default): NSCLC LUNG1-001 and imlab id001 in the pool, imlab id002 in the test pool
    (``pool_real`` / ``test_real`` change it: the shipped model trained on imlab id002, so its campaign
    tests on id001, its validation scan)."""
    pool = phantom_cases("p", n_pool, 1000 + seed, shape)
    test = phantom_cases("t", n_test, 5000 + seed, shape)  # test pool: fixed per seed, never annotated
    notes = []
    if real:
        rp = [c for c in (real_case(n, real_max_slices) for n in pool_real) if c]
        rt = [c for c in (real_case(n, real_max_slices) for n in test_real) if c]
        pool += rp
        test += rt
        if not rp + rt:
            notes.append("../shared/data not found: no real scans")
        les, les_test = lesion_cases(rp, seed), lesion_cases(rt, 9000 + seed)
        pool += les
        test += les_test
        notes.append(f"synthetic lesions on real lungs: {len(les)} pool scan(s), {len(les_test)} test scan(s)")
    # neutral, seeded ids: 'first' (sorted ids) must not pick by kind
    order = np.random.default_rng(seed).permutation(len(pool))
    for rank, i in enumerate(order):
        pool[i].info["source_id"] = pool[i].id
        pool[i].id = f"scan_{rank:02d}"
    pool.sort(key=lambda c: c.id)
    return {"pool": pool, "test": test, "notes": notes}


def write_case(case: Case, folder: Path) -> tuple:
    """Image (int16 HU) and label (uint8) as .nii.gz in ``folder`` -> (image path, label path)."""
    folder.mkdir(parents=True, exist_ok=True)
    ip, lp = folder / f"{case.id}.nii.gz", folder / f"{case.id}_label.nii.gz"
    img = sitk.Cast(sitk.Round(sitk.Clamp(case.image, sitk.sitkFloat32, -1024, 3071)), sitk.sitkInt16)
    sitk.WriteImage(img, str(ip))
    sitk.WriteImage(sitk.Cast(case.label, sitk.sitkUInt8), str(lp))
    return ip, lp


def describe(cases: list) -> dict:
    kinds: dict = {}
    for c in cases:
        k = kinds.setdefault(c.kind, {"scans": 0, "positive": 0, "slices": 0})
        k["scans"] += 1
        k["positive"] += int(c.positive)
        k["slices"] += int(c.image.GetDepth())
    return kinds
