"""Real public chest-CT data (``../shared/data``) and prepared downloads -> model-space slice sets.

Every source goes through the ONE pre-processing path of the product: ``io.read_image`` (HU, or 8-bit
pictures mapped onto the lung window) -> ``preprocess.to_model_slices`` / ``label_to_model_slices`` ->
``training.slices_from_arrays``. Each slice carries a group id (patient / study) and the split is
made by group id (``training.split_by_group``), never by file.

Sources (see ``SOURCES`` for labels and licenses):

- ``medseg``   50 MedSeg slices (8-bit, lung-windowed, cropped), expert infection masks. They have no
  lung mask: a **weak** lung mask is made by a classical method (``weak_lung_mask``) and the set is
  flagged ``weak_lung=True``. The slices are stored rotated by 90 degrees (anterior on the left);
  they are turned clockwise to the radiological display (anterior up, patient right on the left).
- ``cls2d``    2,367 slice pictures with a class label only (UCSD COVID-CT, MosMed, Ma Jun 20 cases).
  With ``normal_infection=True`` the 179 MosMed CT-0 slices (studies read as normal) also carry an
  **empty infection mask** -- a label derived from the study's CT-0 grade, flagged as such: the
  infection head then sees real normal lung (vessels, hila, diaphragm) as "no infection", which the
  all-positive MedSeg slices cannot teach. UCSD's non-COVID pictures are left class-only (some show
  other lung disease).
- ``imlab``    2 HU volumes with expert lung masks (no infection labels).
- ``majun``    4 slices of Ma Jun's 20-case set with expert lung masks (1 / 2 = the two lungs -> lung 1).
  The ``.npy`` slices are stored transposed (anterior on the left); they are transposed back. The
  coronacases slices are int16 HU, the radiopaedia slice is uint8 (read as 8-bit).
- ``wholescans`` 2 whole HU scans as hard negatives (``hybrid_ct.data.wholescans``), never in validation.
- ``phantoms`` the project's synthetic HU phantoms with exact lung and infection labels.
- prepared downloads (``hybrid-ct download``): MONAI Label datastores of HU volumes with 0/1/2 labels,
  or 2D class sets with a ``manifest.csv``.

COVID-CT-MD (``volumes_covid_ct_md``) is never loaded for training: it is the scan-level check only.

Weak lung masks (decision): MedSeg's lung is not left unknown but filled by ``weak_lung_mask`` --
smoothing, Otsu threshold, small dark components removed, union with the expert infection mask,
closing, hole filling, the (up to) two largest components kept. The lung head therefore sees real
COVID texture; the weakness is recorded (``SourceSet.weak_lung``) and lung metrics on MedSeg are
reported separately as "against weak masks", never as the headline lung Dice. The method's own
quality is measured against expert masks by ``weak_mask_agreement``.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from hybrid_ct.contract import LABELS
from hybrid_ct.errors import InputError
from hybrid_ct.imaging.reader import read_image
from hybrid_ct.processing.grid import array_to_image, window
from hybrid_ct.processing.transforms import label_to_model_slices, to_model_slices
from hybrid_ct.data.slice_store import slices_from_arrays
from hybrid_ct.data.wholescans import load_wholescans
from hybrid_ct.data.slice_store import SourceSet
from hybrid_ct.data.slice_store import stack_sets
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.data.manifest import canonical_group
from hybrid_ct.data.manifest import data_root
from hybrid_ct.data.manifest import read_manifest
from hybrid_ct.data.manifest import require_data_root
from hybrid_ct.data.weak_masks import rotate_to_display
from hybrid_ct.data.manifest import stable_order
from hybrid_ct.data.weak_masks import weak_lung_mask

log = logging.getLogger(__name__)

NORMAL_STUDY_SOURCES = ("mosmed_CT0",)  # MANIFEST sources whose studies were read as normal (CT-0)

SOURCES = {
    "medseg": {
        "title": "MedSeg COVID-19 CT segmentation, 50 training slices (via Inf-Net / COVID-SemiSeg)",
        "labels": "infection (expert); lung WEAK (threshold + morphology); every slice positive",
        "license": "medicalsegmentation.com / Inf-Net redistribution: non-commercial research use",
        "commercial": False,
    },
    "cls2d": {
        "title": "CT slice pictures for classification: UCSD COVID-CT, MosMed (1 slice/study), Ma Jun 20 cases",
        "labels": "class (1 COVID-19 / 0 not); MosMed CT-0 slices: empty infection mask DERIVED from the CT-0 grade",
        "license": "UCSD COVID-CT: images belong to the publishers of the source papers (research only); "
                   "MosMed: CC BY-NC-ND 3.0 (non-commercial); Ma Jun 20 cases: CC BY 4.0, Radiopaedia cases CC BY-NC-SA",
        "commercial": False,
    },
    "imlab": {
        "title": "imlab-uiip lung-segmentation-3d demo volumes (2 HU volumes, 128x128x64)",
        "labels": "lung (annotator not stated)",
        "license": "as distributed by the imlab-uiip/lung-segmentation-3d project (terms not stated)",
        "commercial": False,
    },
    "majun": {
        "title": "Ma Jun et al. COVID-19 CT Lung and Infection set, 4 slices (zenodo 3757476)",
        "labels": "lung (expert, two lungs merged)",
        "license": "CC BY 4.0 (Radiopaedia cases CC BY-NC-SA)",
        "commercial": False,
    },
    "wholescans": {
        "title": "Whole HU chest scans: NSCLC-Radiomics LUNG1-001, COVID-CT-MD cap001 (hybrid_ct.data.wholescans)",
        "labels": "hard negatives: LUNG1-001 expert lung + no infection; cap001 clean slices: no infection",
        "license": "NSCLC-Radiomics: CC BY-NC 3.0 (TCIA); COVID-CT-MD: believed CC BY 4.0",
        "commercial": False,
    },
    "phantoms": {
        "title": "hybrid_ct synthetic chest phantoms (HU) with exact lung and infection labels",
        "labels": "lung, infection, class",
        "license": "generated by this project (Apache-2.0)",
        "commercial": True,
    },
    "covid_ct_md": {
        "title": "COVID-CT-MD P001 (COVID-19) and normal001: full DICOM series -- scan-level check only, never trained on",
        "labels": "scan class; per-slice infection by a radiologist (P001)",
        "license": "believed CC BY 4.0 (Afshar et al., Scientific Data 2021)",
        "commercial": True,
    },
}


# ----------------------------------------------------------------------------------------------------
# orientation fixes and the classical weak lung mask


# ----------------------------------------------------------------------------------------------------
# 2D helpers (one slice -> 3D image -> the product's pre-processing)

def picture_to_display_image(path, intensity: str, orient: str | None) -> sitk.Image:
    """Read a 2D file with ``io.read_image`` and apply a storage-orientation fix (1 mm pixels)."""
    img = read_image(path, intensity=intensity)
    if orient is None:
        return img
    arr = rotate_to_display(sitk.GetArrayFromImage(img)[0], orient)
    out = sitk.GetImageFromArray(arr[None])
    out.SetSpacing(img.GetSpacing())
    return out


def picture_mask(path, orient: str | None) -> np.ndarray:
    p = str(path)
    if p.lower().endswith(".npy"):
        arr = np.load(p, allow_pickle=False)
    else:
        from PIL import Image

        with Image.open(p) as im:
            arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return rotate_to_display(arr, orient)


def slice_to_model(img: sitk.Image, label2d: np.ndarray | None, size: int, fov: str = "square"):
    """A one-slice 3D image (+ its 2D 0/1/2 label) -> (x [1,1,S,S], label [1,S,S] or None)."""
    x, ctx = to_model_slices(img, size, fov)
    if label2d is None:
        return x, None
    lab_img = array_to_image(np.asarray(label2d, dtype=np.uint8)[None], img)
    return x, label_to_model_slices(lab_img, ctx)


def npy_intensity(raw: np.ndarray) -> str:
    """Ma Jun's .npy slices: signed integers with negatives are HU, the rest 8-bit pictures."""
    return "hu" if raw.dtype.kind == "i" and raw.min() < 0 else "8bit-auto"


def window01(img: sitk.Image) -> np.ndarray:
    return window(sitk.GetArrayViewFromImage(img)[0])


def _limit_groups(rows: list, limit: int | None, key=lambda r: r["group"], seed: int = 0) -> list:
    """Keep whole groups (stable pseudo-random order) until ``limit`` rows are reached."""
    if not limit or len(rows) <= limit:
        return rows
    by = {}
    for r in rows:
        by.setdefault(key(r), []).append(r)
    out = []
    for g in stable_order(by, seed):
        if len(out) >= limit:
            break
        out += by[g]
    return out


# ----------------------------------------------------------------------------------------------------
# loaders of ../shared/data

def load_medseg(root=None, size: int = 256, weak_lung: bool = True, limit: int | None = None,
                progress: bool = False, fov: str = "square") -> SourceSet:
    """MedSeg slices: 8-bit pictures, expert infection mask, weak lung mask (or lung unknown)."""
    root = require_data_root(root)
    rows = [r for r in read_manifest(root) if r["path"].startswith("seg2d_medseg/images/")]
    rows = [dict(r, group=canonical_group(r["group_id"])) for r in rows]
    rows = _limit_groups(sorted(rows, key=lambda r: r["path"]), limit)
    parts, files = [], []
    for r in tqdm(rows, desc="medseg", unit="slice", disable=not progress, leave=False):
        stem = Path(r["path"]).stem
        img = picture_to_display_image(root / r["path"], "8bit-auto", "rot90cw")
        inf = picture_mask(root / "seg2d_medseg" / "infection_mask" / f"{stem}.png", "rot90cw") > 127
        label = inf.astype(np.uint8) * LABELS["infection"]
        if weak_lung:
            lung = weak_lung_mask(window01(img), inf, clear_border=False)
            label[lung & ~inf] = LABELS["lung"]
        x, lab = slice_to_model(img, label, size, fov)
        parts.append(slices_from_arrays(x, lab, r["group"], diagnosis=1, lung_known=weak_lung))
        files.append(r["path"])
    return SourceSet("medseg", stack_sets(parts, size), weak_lung=weak_lung, files=files)


def _cls2d_orientation(path: str) -> str | None:
    """Ma Jun's 20-case pictures are stored turned: coronacases with anterior on the right, Radiopaedia
    cases with anterior on the left (checked by eye on every case); the others are upright."""
    name = Path(path).name
    if name.startswith("majun20__coronacases"):
        return "rot90ccw"
    if name.startswith("majun20__radiopaedia"):
        return "rot90cw"
    return None


def load_cls2d(root=None, size: int = 256, limit: int | None = None, progress: bool = False,
               normal_infection: bool = False, fov: str = "square") -> SourceSet:
    """Classification pictures (class only). ``limit`` keeps about half positives, half negatives.
    ``normal_infection``: MosMed CT-0 slices (normal studies) get an empty infection mask (derived label)."""
    root = require_data_root(root)
    rows = [dict(r, group=canonical_group(r["group_id"])) for r in read_manifest(root)
            if r["task"] == "cls" and r["path"].startswith("cls2d/")]
    rows.sort(key=lambda r: r["path"])
    if limit:
        pos = [r for r in rows if r["label"] == "1"]
        neg = [r for r in rows if r["label"] != "1"]
        rows = _limit_groups(pos, (limit + 1) // 2) + _limit_groups(neg, limit // 2)
    parts, files = [], []
    skipped = 0
    for r in tqdm(rows, desc="cls2d", unit="slice", disable=not progress, leave=False):
        try:
            img = picture_to_display_image(root / r["path"], "8bit-auto", _cls2d_orientation(r["path"]))
        except InputError as e:
            skipped += 1
            log.warning("skipping %s: %s", r["path"], e)
            continue
        x, _ = slice_to_model(img, None, size, fov)
        label = int(r["label"])
        if normal_infection and r["source"] in NORMAL_STUDY_SOURCES:
            empty = np.zeros((len(x),) + x.shape[-2:], np.uint8)
            part = slices_from_arrays(x, empty, r["group"], diagnosis=0, lung_known=False, infection_known=True)
        else:
            part = slices_from_arrays(x, None, r["group"], diagnosis=label, lung_known=False, infection_known=False)
        part.cls[:] = label  # a class-only slice: its own label (positive slices of a positive scan too)
        parts.append(part)
        files.append(r["path"])
    if skipped:
        log.warning("cls2d: %d unreadable pictures skipped", skipped)
    return SourceSet("cls2d", stack_sets(parts, size), files=files)


def load_imlab(root=None, size: int = 256, limit: int | None = None, progress: bool = False,
               fov: str = "square") -> SourceSet:
    """HU volumes with expert lung masks (infection unknown, class unknown)."""
    root = require_data_root(root)
    parts, files = [], []
    folder = root / "lung3d_imlab"
    cases = sorted(p.name[: -len("_image_hu.nii.gz")] for p in folder.glob("*_image_hu.nii.gz"))
    for cid in tqdm(cases, desc="imlab", unit="volume", disable=not progress, leave=False):
        img = read_image(folder / f"{cid}_image_hu.nii.gz")
        lab = sitk.ReadImage(str(folder / f"{cid}_lungmask.nii.gz"))
        x, ctx = to_model_slices(img, size, fov)
        lab_m = (label_to_model_slices(lab, ctx) > 0).astype(np.uint8)
        part = slices_from_arrays(x, lab_m, f"imlab_{cid}", lung_known=True, infection_known=False,
                                  dz_mm=ctx.canon_spacing[0])
        if limit:
            keep = np.linspace(0, len(part) - 1, num=min(limit, len(part))).round().astype(int)
            part = part.subset(np.unique(keep))
        parts.append(part)
        files += [f"lung3d_imlab/{cid}_image_hu.nii.gz"] * len(part)
    return SourceSet("imlab", stack_sets(parts, size), files=files)


def load_majun(root=None, size: int = 256, progress: bool = False, fov: str = "square") -> SourceSet:
    """Ma Jun slices: transposed .npy (coronacases int16 HU, radiopaedia uint8), lung masks 1/2 -> 1."""
    root = require_data_root(root)
    folder = root / "lung2d_majun"
    parts, files = [], []
    for p in sorted(folder.glob("*_image_slice_*.npy")):
        mask_p = folder / p.name.replace("_image_slice_", "_masks_slice_")
        img = picture_to_display_image(p, npy_intensity(np.load(p, allow_pickle=False)), "transpose")
        lung = (picture_mask(mask_p, "transpose") > 0).astype(np.uint8) * LABELS["lung"]
        x, lab = slice_to_model(img, lung, size, fov)
        parts.append(slices_from_arrays(x, lab, canonical_group(p.name), lung_known=True, infection_known=False))
        files.append(f"lung2d_majun/{p.name}")
    return SourceSet("majun", stack_sets(parts, size), files=files)


PHANTOM_SHAPE = (32, 128, 128)


def phantom_specs(n: int, seed: int = 1000) -> list:
    """The (seed, positive) of each of ``load_phantoms``' ``n`` phantoms (about 2/3 positive)."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**31 - 1, size=n)
    positives = np.zeros(n, bool)
    positives[: int(round(n * 2 / 3))] = True
    rng.shuffle(positives)
    return [(int(a), bool(b)) for a, b in zip(seeds, positives)]


def load_phantoms(n: int = 24, size: int = 256, shape=PHANTOM_SHAPE, seed: int = 1000,
                  progress: bool = False, fov: str = "square") -> SourceSet:
    """``n`` synthetic phantoms (about 2/3 positive), made in memory; group = phantom."""

    parts, files = [], []
    for i, (s, positive) in enumerate(tqdm(phantom_specs(n, seed), desc="phantoms", unit="volume",
                                           disable=not progress, leave=False)):
        img, lab, info = make_phantom(s, shape=tuple(shape), positive=positive)
        x, ctx = to_model_slices(img, size, fov)
        part = slices_from_arrays(x, label_to_model_slices(lab, ctx), f"phantom_{seed}_{i:03d}",
                                  diagnosis=int(info["positive"]), dz_mm=ctx.canon_spacing[0])
        parts.append(part)
        files += [f"phantom seed {s}"] * len(part)
    return SourceSet("phantoms", stack_sets(parts, size), files=files)


# ----------------------------------------------------------------------------------------------------
# prepared downloads (see hybrid_ct.data.download)

def load_prepared(folder, size: int = 256, limit: int | None = None, progress: bool = False,
                  fov: str = "square") -> SourceSet:
    """A folder written by ``hybrid-ct download``: a volume datastore (``dataset.csv``: id, image,
    label, group_id, intensity) or a 2D class set (``manifest.csv``: path, label, group_id)."""
    folder = Path(folder)
    if (folder / "dataset.csv").is_file():
        with open(folder / "dataset.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        rows = [dict(r, group=canonical_group(r["group_id"])) for r in rows]
        rows = _limit_groups(rows, limit)
        parts, files = [], []
        for r in tqdm(rows, desc=folder.name, unit="volume", disable=not progress, leave=False):
            img = read_image(folder / r["image"], intensity=r.get("intensity") or "hu")
            lab = sitk.ReadImage(str(folder / r["label"]))
            x, ctx = to_model_slices(img, size, fov)
            parts.append(slices_from_arrays(x, label_to_model_slices(lab, ctx), r["group"], diagnosis=1,
                                            dz_mm=ctx.canon_spacing[0]))
            files += [r["image"]] * len(x)
        return SourceSet(folder.name, stack_sets(parts, size), files=files)
    if (folder / "manifest.csv").is_file():
        with open(folder / "manifest.csv", newline="") as f:
            rows = [dict(r, group=canonical_group(r["group_id"])) for r in csv.DictReader(f)]
        rows = _limit_groups(rows, limit)
        parts, files = [], []
        for r in tqdm(rows, desc=folder.name, unit="slice", disable=not progress, leave=False):
            try:
                img = read_image(folder / r["path"], intensity="8bit-auto")
            except InputError as e:
                log.warning("skipping %s: %s", r["path"], e)
                continue
            x, _ = slice_to_model(img, None, size, fov)
            part = slices_from_arrays(x, None, r["group"], lung_known=False, infection_known=False)
            part.cls[:] = int(r["label"])
            parts.append(part)
            files.append(r["path"])
        return SourceSet(folder.name, stack_sets(parts, size), files=files)
    raise InputError(f"{folder} is not a prepared data set (no dataset.csv or manifest.csv): run hybrid-ct download")


# ----------------------------------------------------------------------------------------------------
# all sources, the split, the scan-level check cases

REAL_SOURCES = ("medseg", "cls2d", "imlab", "majun", "wholescans")


def load_sources(root=None, size: int = 256, sources=REAL_SOURCES, phantoms: int = 24,
                 phantom_shape=PHANTOM_SHAPE, limit: int | None = None, extra=(), weak_lung: bool = True,
                 normal_infection: bool = False, progress: bool = True, fov: str = "square") -> list:
    """Load the named real sources (+ ``phantoms`` phantoms, + prepared ``extra`` folders) for ``fov``."""
    out = []
    for name in sources:
        if name == "medseg":
            out.append(load_medseg(root, size, weak_lung=weak_lung, limit=limit, progress=progress, fov=fov))
        elif name == "cls2d":
            out.append(load_cls2d(root, size, limit=limit, progress=progress, normal_infection=normal_infection,
                                  fov=fov))
        elif name == "imlab":
            out.append(load_imlab(root, size, limit=limit, progress=progress, fov=fov))
        elif name == "majun":
            out.append(load_majun(root, size, progress=progress, fov=fov))
        elif name == "wholescans":  # hard negatives: whole HU scans (hybrid_ct.data.wholescans)
            out.append(load_wholescans(root, size, progress=progress, fov=fov))
        else:
            raise InputError(f"unknown data source {name!r}: choose from {REAL_SOURCES}")
    if phantoms:
        out.append(load_phantoms(phantoms, size, shape=phantom_shape, progress=progress, fov=fov))
    for folder in extra:
        out.append(load_prepared(folder, size, limit=limit, progress=progress, fov=fov))
    for s in out:
        log.info("%s: %s", s.name, s.summary())
    return out


SHIPPED_RECIPE = Path(__file__).resolve().parents[1] / "train" / "recipes" / "shipped.json"


def training_levels(root=None, data_spec: dict | None = None) -> dict:
    """The parenchyma level (``processing.density.parenchyma_level``) of each HU volume a recipe trains on:
    imlab's two, LUNG1-001, cap001 and its phantoms (``data_spec``: the recipe's "data"; default the shipped
    recipe's). The densest is the contract's ``training_max_level_hu``."""
    import json

    from hybrid_ct.data.wholescans import SCANS
    from hybrid_ct.imaging.body import body_mask
    from hybrid_ct.processing.density import parenchyma_level

    d = data_spec or json.loads(SHIPPED_RECIPE.read_text())["data"]
    root = Path(data_root(root))
    paths = {f"imlab {p.name.split('_')[0]}": p for p in sorted((root / "lung3d_imlab").glob("*_image_hu.nii.gz"))}
    paths.update({name: root / rel for name, (rel, _, _) in SCANS.items()})
    images = {k: read_image(p) for k, p in paths.items() if p.exists()}
    for i, (s, positive) in enumerate(phantom_specs(int(d.get("phantoms", 0)))):
        images[f"phantom {i:03d}"] = make_phantom(s, shape=tuple(d["phantom_shape"]), positive=positive)[0]
    return {k: parenchyma_level(sitk.GetArrayViewFromImage(img), body_mask(img)) for k, img in images.items()}


if __name__ == "__main__":  # python -m hybrid_ct.data.sources [data root]: the contract's training level
    import sys

    from hybrid_ct.processing.density import TRAINING_MAX_LEVEL_HU

    levels = training_levels(sys.argv[1] if len(sys.argv) > 1 else None)
    for name, level in levels.items():
        print(f"{name}: parenchyma level {level:.1f} HU")
    if levels:
        print(f"densest: {max(levels.values()):.1f} HU (contract training_max_level_hu {TRAINING_MAX_LEVEL_HU:.1f})")
