"""Whole HU chest scans as training data: the hard negatives of the whole-scan call.

The 2D pictures that make up most of the training data are cropped to the lungs; a whole scan also has
the neck, the shoulders, the diaphragm domes, bowel gas and the table -- where the earlier models put
false lung and false infection. These two scans of ``../shared/data/volumes_hu`` join training:

- ``nsclc_lung1_001`` (NSCLC-Radiomics LUNG1-001): no infection, expert left/right lung contours. Every
  slice is used, with the expert lung mask and an empty infection mask (its tumour is not infection).
- ``cap001`` (COVID-CT-MD, community-acquired pneumonia): per-slice radiologist labels, no masks. Only
  the slices read as clean are used, as empty-infection negatives (lung unknown); the infected slices
  carry neither a mask nor a COVID-19 class that fits the slice class (infection present), so they stay
  out of training and remain a per-slice sensitivity check.

COVID-CT-MD P001 and normal001 stay out of training: they are the never-trained scan-level check.
Each scan is one group (``wholescan_<name>``), so a split never cuts through a scan.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from hybrid_ct.imaging.reader import read_image
from hybrid_ct.processing.transforms import label_to_model_slices, to_model_slices
from hybrid_ct.data.slice_store import slices_from_arrays
from hybrid_ct.data.slice_store import SourceSet, stack_sets

SCANS = {  # name: (image, lung reference or None, per-slice labels or None)
    "nsclc_lung1_001": ("volumes_hu/nsclc_lung1_001/image_hu.nii.gz", "volumes_hu/nsclc_lung1_001/lung_lr.nii.gz", None),
    "cap001": ("volumes_hu/covidctmd_cap001/image_hu.nii.gz", None, "volumes_hu/covidctmd_cap001/slice_labels.csv"),
}
FAMILY = "wholescan"


def clean_slices(labels_csv, image: sitk.Image) -> np.ndarray:
    """A [z, y, x] uint8 volume on ``image``'s grid: 1 on the slices read as infection-free, else 0
    (``z_index`` is the SimpleITK slice index of the NIfTI file)."""
    with open(labels_csv, newline="") as f:
        rows = {int(r["z_index"]): int(r["infection"]) for r in csv.DictReader(f)}
    n_z = image.GetSize()[2]
    clean = np.zeros(n_z, bool)
    for z, infected in rows.items():
        if 0 <= z < n_z:
            clean[z] = infected == 0
    vol = np.zeros(image.GetSize()[::-1], np.uint8)
    vol[clean] = 1
    return vol


def _to_grid(vol: np.ndarray, image: sitk.Image, ctx) -> np.ndarray:
    lab = sitk.GetImageFromArray(vol)
    lab.CopyInformation(image)
    return label_to_model_slices(lab, ctx)


def load_scan(root: Path, name: str, size: int, fov: str = "square"):
    """One whole scan -> (SliceSet, files); see the module docstring for what each slice carries."""
    rel, lung_rel, labels_rel = SCANS[name]
    img = read_image(root / rel)
    x, ctx = to_model_slices(img, size, fov)
    group = f"{FAMILY}_{name}"
    if lung_rel:
        lung = (sitk.GetArrayFromImage(sitk.ReadImage(str(root / lung_rel))) > 0).astype(np.uint8)
        part = slices_from_arrays(x, _to_grid(lung, img, ctx), group, diagnosis=0, dz_mm=ctx.canon_spacing[0])
    else:
        part = slices_from_arrays(x, np.zeros(x.shape[:1] + x.shape[2:], np.uint8), group, diagnosis=0,
                                  lung_known=False, dz_mm=ctx.canon_spacing[0])
    if labels_rel:
        keep = np.flatnonzero(_to_grid(clean_slices(root / labels_rel, img), img, ctx).reshape(len(x), -1).any(1))
        part = part.subset(keep)
    assert not (part.infection == 1).any()  # negatives only
    return part, [rel] * len(part)


def load_wholescans(root, size: int = 256, names=tuple(SCANS), progress: bool = False, fov: str = "square"):
    """The whole HU scans of ``SCANS`` present under ``root`` -> SourceSet ``wholescans`` (empty if none)."""

    parts, files = [], []
    for name in tqdm(names, desc="whole scans", unit="scan", disable=not progress, leave=False):
        if not (Path(root) / SCANS[name][0]).is_file():
            continue
        part, f = load_scan(Path(root), name, size, fov)
        parts.append(part)
        files += f
    return SourceSet("wholescans", stack_sets(parts, size), files=files)
