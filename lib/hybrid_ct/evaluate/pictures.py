"""Evaluations of the picture path behind ``hybrid-ct evaluate``:

- ``orientation_check``: validation pictures with infection masks (MedSeg) rotated by 0 / 90 / 180 / 270
  degrees through the product path (``Predictor.predict``: the label map comes back in the input's own
  orientation), scored against the truth rotated the same way -- does the model read a turned picture?
- ``picture_pixel_mm2``: the area of one model-space pixel of each 2D picture (pictures are read with
  1 mm pixels), so that ``diagnosis.slice_call`` can be measured in ``evaluation.evaluate_sets``;
- ``loso_results``: leave-one-source-out checkpoints (``hybrid-ct train --hold-out-source``,
  ``scripts/loso.sh``) scored on the collection they never saw.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hybrid_ct.errors import InputError
from hybrid_ct.data.sources import picture_mask, picture_to_display_image, window01
from hybrid_ct.data.manifest import canonical_group, data_root, group_family, read_manifest, require_data_root
from hybrid_ct.train.metrics import dice
from hybrid_ct.data.weak_masks import weak_lung_mask
from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.predict.predictor import Predictor, run_on_slices
from hybrid_ct.train.metrics import classification_metrics, sensitivity_at_specificity
from hybrid_ct.train.recipes import HOLD_OUT_SOURCES, held_out_groups, load_recipe_data
from hybrid_ct.data.sources import npy_intensity
from hybrid_ct.imaging.reader import read_image
from hybrid_ct.processing.grid import window

log = logging.getLogger("hybrid_ct")

ANGLES = (0, 90, 180, 270)  # counter-clockwise, as np.rot90
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------
# orientation

def rotate_image(img: sitk.Image, angle: int) -> sitk.Image:
    """A one-slice (or any) axial image with every slice turned by ``angle`` degrees counter-clockwise as
    displayed (``np.rot90`` on the y, x axes); the in-plane spacing follows the axes."""
    k = (int(angle) // 90) % 4
    arr = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.rot90(arr, k, axes=(1, 2))))
    sx, sy, sz = img.GetSpacing()
    out.SetSpacing((sy, sx, sz) if k % 2 else (sx, sy, sz))
    out.SetOrigin(img.GetOrigin())
    out.SetDirection(img.GetDirection())
    return out


def rotate_mask(mask2d: np.ndarray, angle: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(np.asarray(mask2d), (int(angle) // 90) % 4))


def medseg_pictures(root, val_groups) -> list:
    """The MedSeg validation pictures as the loader reads them (upright, 8-bit-auto), each
    ``(name, image, infection mask, WEAK lung mask)``; the lung mask includes the infection."""

    root = require_data_root(root)
    val = set(val_groups)
    rows = sorted({r["path"] for r in read_manifest(root) if r["path"].startswith("seg2d_medseg/images/")
                   and canonical_group(r["group_id"]) in val})
    out = []
    for path in rows:
        img = picture_to_display_image(root / path, "8bit-auto", "rot90cw")
        inf = picture_mask(root / "seg2d_medseg" / "infection_mask" / f"{Path(path).stem}.png", "rot90cw") > 127
        lung = weak_lung_mask(window01(img), inf, clear_border=False) | inf
        out.append((path, img, inf, lung))
    return out


def orientation_check(predictor, items: list, angles=ANGLES) -> dict:
    """Each ``(name, image, infection, lung)`` of ``items`` rotated by each angle through
    ``predictor.predict``; per angle the mean slice Dice of infection and lung (lung: against the masks
    given, WEAK for MedSeg), their n, pictures refused, pictures called positive; and the largest gap to
    upright (angle 0) of each mean."""
    res = {"angles": {}, "pictures": len(items)}
    for angle in angles:
        inf_d, lung_d, refused, positive = [], [], 0, 0
        for name, img, inf, lung in items:
            try:
                label, report = predictor.predict(rotate_image(img, angle))
            except InputError as e:
                refused += 1
                log.info("orientation %d: %s refused: %s", angle, name, e)
                continue
            pred = sitk.GetArrayFromImage(label)[0]
            t_inf, t_lung = rotate_mask(inf, angle), rotate_mask(lung, angle)
            if t_inf.any():
                inf_d.append(dice(pred == 2, t_inf))
            if t_lung.any():
                lung_d.append(dice(pred > 0, t_lung))
            positive += int(report["classification"]["slice_positive"][0])
        res["angles"][str(angle)] = {
            "infection_dice": float(np.mean(inf_d)) if inf_d else float("nan"), "infection_n": len(inf_d),
            "lung_dice": float(np.mean(lung_d)) if lung_d else float("nan"), "lung_n": len(lung_d),
            "refused": refused, "called_positive": positive}
    up = res["angles"].get("0")
    for key in ("infection_dice", "lung_dice"):
        gaps = [abs(v[key] - up[key]) for a, v in res["angles"].items() if a != "0"] if up else []
        gaps = [g for g in gaps if not np.isnan(g)]
        res[f"max_gap_{key}"] = float(max(gaps)) if gaps else float("nan")
    return res


# ----------------------------------------------------------------------------------------------------
# the model-space pixel area of pictures (for diagnosis.slice_call)

def picture_pixel_mm2(root, source, size: int):
    """Per slice of SourceSet ``source``, the area in mm^2 of one model-space pixel, for sources of 2D
    pictures (one file per slice, read with 1 mm pixels by ``io.read_image``; the model grid is the
    square field of view of the larger side, ``preprocess.square_pad``); None for other sources."""
    files = source.files
    if not len(source) or len(files) != len(source):
        return None
    out = np.empty(len(files))
    for i, f in enumerate(files):
        p = Path(root) / f
        suffix = p.suffix.lower()
        if not p.is_file():
            return None
        if suffix in PICTURE_SUFFIXES:
            from PIL import Image

            with Image.open(p) as im:
                side = max(im.size)
        elif suffix == ".npy":
            shape = np.load(p, mmap_mode="r", allow_pickle=False).shape
            if len(shape) != 2:
                return None
            side = max(shape)
        else:
            return None
        out[i] = (side / size) ** 2
    return out


# ----------------------------------------------------------------------------------------------------
# leave-one-source-out

def _collection_slices(sets: list, family: str, groups: set):
    """The class-labelled slices of collection ``family`` among ``groups``, from every source."""

    parts = []
    for s in sets:
        sl = s.slices
        idx = [i for i, g in enumerate(sl.group) if g in groups and group_family(g) == family and sl.cls[i] >= 0]
        if idx:
            parts.append(sl.subset(idx))
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out.extend(p)
    return out


def loso_results(paths, data=None, progress: bool = True, min_specificity: float = 0.85) -> list:
    """Score leave-one-source-out checkpoints: a checkpoint trained with ``data.hold_out`` = C on every
    class-labelled slice of C (which its split kept out of training: checked); one without (the same
    schedule on the pooled split) on the validation slices of each collection. -> rows {path, kind,
    iterations, hold_out, collection, metrics (classification_metrics + ``at_spec``)}."""

    cache, rows = {}, []
    for path in paths:
        model, meta = load_checkpoint(path)
        recipe = meta.get("recipe")
        if not recipe:
            raise InputError(f"{path}: no recipe in the checkpoint (not made by hybrid-ct train)")
        hold = recipe["data"].get("hold_out")
        root = data_root(data or None)
        if not (root / "MANIFEST.csv").is_file() and meta.get("data_root"):
            root = Path(meta["data_root"])
        key = (json.dumps({k: v for k, v in recipe["data"].items() if k != "hold_out"}, sort_keys=True),
               model.cfg.in_size, str(root))
        if key not in cache:
            cache[key] = load_recipe_data(recipe, root, model.cfg.in_size, progress=progress)
        sets = cache[key]
        val = set(meta.get("val_groups") or [])
        if hold:
            groups = held_out_groups(sets, hold)
            leaked = sorted(groups - val)
            if leaked:
                raise InputError(f"{path}: {len(leaked)} groups of the held-out {hold} were not in its validation "
                                 f"split (e.g. {leaked[0]}): it was trained on them")
        predictor = Predictor(model, progress=False)
        for fam in ([hold] if hold else HOLD_OUT_SOURCES):
            sl = _collection_slices(sets, fam, val)
            if sl is None:
                continue
            so = run_on_slices(predictor, sl)
            y = sl.cls.astype(int)
            m = classification_metrics(y, so.positive_prob, y_pred=so.predicted)
            m.pop("roc", None)
            m["at_spec"] = sensitivity_at_specificity(y, so.positive_prob, min_specificity)
            m["groups"] = len(set(sl.group))
            rows.append({"path": str(path), "kind": meta.get("kind"), "iterations": meta.get("iterations"),
                         "hold_out": hold, "collection": fam, "metrics": m})
            log.info("loso %s: %s on %s: AUC %.3f, n %d", path, hold or "pooled", fam, m["auc"], m["n"])
    return rows


def weak_mask_agreement(root=None) -> dict:
    """Dice of ``weak_lung_mask`` against expert lung masks (imlab lung slices, Ma Jun slices), full
    field of view (``clear_border=True``): the measured quality of the weak-label method."""
    root = require_data_root(root)
    scores = {"imlab": [], "majun": []}
    folder = root / "lung3d_imlab"
    for p in sorted(folder.glob("*_image_hu.nii.gz")):
        img = read_image(p)
        arr = window(sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")))
        lab = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(p).replace("_image_hu", "_lungmask")), "LPS"))
        for z in range(0, arr.shape[0], 2):  # every other slice: the same picture at half the cost
            if lab[z].sum() > 0.02 * lab[z].size:
                scores["imlab"].append(dice(weak_lung_mask(arr[z], clear_border=True), lab[z] > 0))
    for p in sorted((root / "lung2d_majun").glob("*_image_slice_*.npy")):
        img = picture_to_display_image(p, npy_intensity(np.load(p, allow_pickle=False)), "transpose")
        mask = picture_mask(p.with_name(p.name.replace("_image_slice_", "_masks_slice_")), "transpose") > 0
        scores["majun"].append(dice(weak_lung_mask(window01(img), clear_border=True), mask))
    return {k: {"n": len(v), "dice_mean": float(np.mean(v)) if v else float("nan"),
                "dice_median": float(np.median(v)) if v else float("nan")} for k, v in scores.items()}
