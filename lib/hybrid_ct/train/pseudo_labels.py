"""Pseudo-labels for unlabelled positive slices (Semi-Inf-Net's idea, issue 27 point 2).

A teacher checkpoint outlines infection on training slices that are known to be positive but have no
infection mask (by default Ma Jun's 8-bit cropped COVID-19 pictures in ``cls2d``, collection ``majun20``);
the outlines it is confident about become the slices' infection targets, so the student learns what real
disease looks like on more than MedSeg's 50 pictures.

Leakage: only the *training* side of the split is ever passed here (``recipes.recipe_slices`` calls it after
the split), so no validation picture gets a pseudo-label; whole scans (P001, cap001) are evaluation scans and
are not in any default family. A slice whose class is not 1 is never pseudo-labelled: a slice the
radiologist (or the collection) calls clean stays clean.

The confidence rule, stated before any result was seen and not tuned on a reported scan: the teacher's
infection probability is the mean over the slice and its mirror image; pixels with ``low < p < high`` (0.3 ..
0.7) are the *ignore band*. A slice keeps its pseudo-label only when

- the teacher outlines at least ``min_area_mm2`` (50 mm^2, the outline rule of the slice-level checks) with
  ``p >= 0.5``: on a slice known to be positive, an empty outline says the teacher missed, not that it is clean;
- the band holds at most ``max_band`` (half) of the pixels the teacher is not sure are clean (``p > low``):
  a blurred, hesitant outline is dropped rather than taught. The first rule allowed a quarter; on the
  training split's 103 Ma Jun candidates (shipped teacher) it kept 3, because a soft rim around a real
  outline already fills about a third of it (median 0.42). Half keeps 65. This was decided on the training
  pictures' keep rate before any student was trained, not on an evaluation scan.

The mask kept is ``p >= 0.5``, the teacher's own decision, so the outline is not systematically shrunk.
The loss has no per-pixel ignore, so the band works per slice.

Results are cached on disk, keyed by the teacher checkpoint's sha256, the settings and the slices' pixels
(``$HYBRID_CT_PSEUDO_CACHE``, default ``~/.cache/hybrid_ct/pseudo_labels``): the 3 seeds of a rebuild and a
resumed build reuse one teacher pass.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_ct.data.manifest import group_family
from hybrid_ct.data.slice_store import MISSING, SourceSet
from hybrid_ct.errors import InputError
from hybrid_ct.files import file_sha256, write_atomic
from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.net.model_files import default_model_path

log = logging.getLogger(__name__)

DEFAULTS = {
    "teacher": "default",  # "default": the shipped model (default_model_path), else a checkpoint path
    "families": ["majun20"],  # collections (manifest.group_family) whose positive slices get pseudo-labels
    "low": 0.3, "high": 0.7,  # the ignore band of the teacher's infection probability
    "max_band": 0.5,  # share of the not-surely-clean pixels (p > low) allowed in the band
    "min_area_mm2": 50.0,  # smallest outline that counts as "the teacher found infection"
    "fov_mm": 350.0,  # model-space pixel size: the grid's field of view (processing.grid pads to ~350 mm)
}
VERSION = 2  # bump when the rule changes: old cache entries are then never read


def settings(spec) -> dict:
    """The recipe's ``data.pseudo`` block (True: the defaults) with the defaults filled in."""
    if spec is True:
        spec = {}
    if not isinstance(spec, dict):
        raise InputError(f"data.pseudo must be true or an object, got {spec!r}")
    unknown = set(spec) - set(DEFAULTS)
    if unknown:
        raise InputError(f"data.pseudo: unknown keys {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    s = {**DEFAULTS, **spec}
    if not 0.0 < s["low"] < 0.5 < s["high"] < 1.0:
        raise InputError(f"data.pseudo: need 0 < low < 0.5 < high < 1, got {s['low']}, {s['high']}")
    return s


def teacher_path(s: dict) -> Path:
    p = default_model_path() if s["teacher"] in ("default", "shipped") else Path(s["teacher"])
    if not Path(p).is_file():
        raise InputError(f"data.pseudo: no teacher checkpoint at {p}")
    return Path(p)


def cache_dir() -> Path:
    return Path(os.environ.get("HYBRID_CT_PSEUDO_CACHE") or Path.home() / ".cache" / "hybrid_ct" / "pseudo_labels")


def candidates(sets: list, families) -> list:
    """(set index, slice index) of every positive slice without an infection mask in ``families``."""
    out = []
    for k, s in enumerate(sets):
        sl = s.slices
        for i in range(len(sl)):
            if group_family(sl.group[i]) in families and int(sl.cls[i]) == 1 and sl.infection[i, 0, 0] == MISSING:
                out.append((k, i))
    return out


@torch.no_grad()
def teacher_probabilities(model, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Infection probability [N,S,S] float32 of the teacher on uint8 model-space slices [N,S,S]: the mean of
    the slice and its left-right mirror (one cheap second opinion), at the teacher's grid, back to S."""
    model.eval()
    size = images.shape[-1]
    out = []
    for a in range(0, len(images), batch_size):
        x = torch.from_numpy(images[a:a + batch_size].astype(np.float32) / 255.0)[:, None]
        if model.cfg.in_size != size:
            x = F.interpolate(x, size=(model.cfg.in_size,) * 2, mode="bilinear", align_corners=False)
        x = x.repeat(1, model.cfg.in_channels, 1, 1)  # a picture is its own neighbour (2.5D teachers)
        p = torch.sigmoid(model(x)["infection"][:, :1])
        p = 0.5 * (p + torch.sigmoid(model(x.flip(-1))["infection"][:, :1]).flip(-1))
        if model.cfg.in_size != size:
            p = F.interpolate(p, size=(size, size), mode="bilinear", align_corners=False)
        out.append(p[:, 0].numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)


def confident_masks(prob: np.ndarray, s: dict, size: int) -> tuple:
    """-> (keep [N] bool, masks [N,S,S] uint8, band share [N]): the confidence rule of the module docstring."""
    px_mm2 = (float(s["fov_mm"]) / size) ** 2
    mask = prob >= 0.5
    unsure = (prob > s["low"]).reshape(len(prob), -1).sum(1)
    band = ((prob > s["low"]) & (prob < s["high"])).reshape(len(prob), -1).sum(1)
    share = np.where(unsure > 0, band / np.maximum(unsure, 1), 1.0)
    area = mask.reshape(len(prob), -1).sum(1) * px_mm2
    keep = (area >= float(s["min_area_mm2"])) & (share <= float(s["max_band"]))
    return keep, mask.astype(np.uint8), share


def _save(tmp, **arrays) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp path
        np.savez_compressed(f, **arrays)


def pseudo_label(train_sets: list, spec, progress: bool = False) -> tuple:
    """``train_sets`` (the training side of the split only) with confident pseudo-labels written into the
    candidates' infection targets -> (new SourceSets, summary dict). Cached on disk (module docstring)."""
    s = settings(spec)
    cand = candidates(train_sets, set(s["families"]))
    tp = teacher_path(s)
    summary = {"teacher": str(tp), "settings": {k: v for k, v in s.items() if k != "teacher"},
               "candidates": len(cand), "kept": 0, "groups": []}
    if not cand:
        log.warning("pseudo-labels: no candidate slice in families %s", s["families"])
        return train_sets, summary
    images = np.stack([train_sets[k].slices.images[i] for k, i in cand])
    teacher_sha = file_sha256(tp)
    h = hashlib.sha256(json.dumps({"v": VERSION, "teacher": teacher_sha, "s": summary["settings"]},
                                  sort_keys=True).encode())
    h.update(images.tobytes())
    path = cache_dir() / f"{h.hexdigest()[:32]}.npz"
    summary["teacher_sha256"], summary["cache"] = teacher_sha, str(path)
    if path.is_file():
        z = np.load(path)
        keep, masks, share = z["keep"], z["masks"], z["share"]
        summary["cached"] = True
    else:
        model, _ = load_checkpoint(tp)
        keep, masks, share = confident_masks(teacher_probabilities(model, images), s, images.shape[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: _save(tmp, keep=keep, masks=masks, share=share))
        summary["cached"] = False
    out = [SourceSet(t.name, t.slices.subset(np.arange(len(t.slices))), t.weak_lung, t.files) for t in train_sets]
    for (k, i), ok, m in zip(cand, keep, masks):
        if ok:
            out[k].slices.infection[i] = m
    summary["kept"] = int(keep.sum())
    summary["band_share_median"] = float(np.median(share))
    summary["groups"] = sorted({str(train_sets[k].slices.group[i]) for (k, i), ok in zip(cand, keep) if ok})
    log.info("pseudo-labels: %d of %d candidate slices kept (teacher %s, cache %s)", summary["kept"],
             len(cand), tp.name, "hit" if summary["cached"] else "written")
    return out, summary
