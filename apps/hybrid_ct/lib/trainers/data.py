"""Training data from the datastore: the fixed validation split and one case's model slices."""
from __future__ import annotations

import logging

import numpy as np

from hybrid_ct.contract import head_targets
from hybrid_ct.errors import InputError
from hybrid_ct.imaging.reader import read_image
from hybrid_ct.processing.grid import slice_spacing
from hybrid_ct.data.slice_store import SliceSet, slices_from_arrays
from hybrid_ct.processing.transforms import model_slices
from hybrid_ct.split import hash_fraction

from ..validation import canonicalise_label, normalise_diagnosis

logger = logging.getLogger(__name__)


def is_validation_image(image_id: str, val_split: float) -> bool:
    """Fixed per image: the same id always lands on the same side for a given ``val_split``."""
    return hash_fraction(image_id) < val_split


def slices_for_case(case: dict, size: int, fov="square") -> SliceSet:
    """One datastore case -> model-space slices with targets (label remapped by its label_info names)."""
    img = read_image(case["image"])
    label_img, _, _ = canonicalise_label(case["label"], case["image"], case.get("label_info", {}).get("label_info"))
    x, lab = model_slices(img, label_img, size, fov)  # transforms.pre_transforms, as at inference
    diagnosis = normalise_diagnosis(case.get("image_info", {}).get("diagnosis"))
    dz = slice_spacing(img)  # each slice keeps its neighbours (a 2.5D network reads them)
    has_infection = bool(head_targets(lab)["infection"].any())
    if diagnosis == "positive" and not has_infection:
        # a positive scan whose label shows no infection: the infection was not drawn -> no infection
        # or class target for its slices; the lung mask still trains
        return slices_from_arrays(x, lab, case["id"], diagnosis=1, infection_known=False, dz_mm=dz)
    s = slices_from_arrays(x, lab, case["id"], dz_mm=dz)
    if diagnosis == "negative":
        s.cls[:] = 0  # the clinical diagnosis wins over the drawing
    return s


def slices_of(cases: list, size: int, fov="square") -> tuple:  # fov: or NetConfig.input_spec()
    """Cases -> (one SliceSet of all their slices, the cases used, the ones skipped with the reason)."""
    out, used, skipped = SliceSet.empty(size), [], []
    for case in cases:
        try:
            s = slices_for_case(case, size, fov)
        except InputError as e:
            skipped.append({"id": case["id"], "reason": str(e)})
            logger.warning("training skips %s: %s", case["id"], e)
            continue
        out, used = out.extend(s), used + [case]
    return out, used, skipped


def split_replay(replay: SliceSet, gate_share: float, n_train: int, seed: int) -> tuple:
    """The replay file -> (slices a retrain trains on, at most ``n_train`` drawn with ``seed``; the gate's
    fixed share). The gate share is chosen by hashing each slice's group and position in the file, so it is
    the same for every retrain and no retrain ever fits it: a drop there is forgetting, not noise of a sample
    the new model has just trained on."""
    keys = np.array([hash_fraction(f"{g}:{i}", "gate:") for i, g in enumerate(replay.group)])
    held = np.flatnonzero(keys < gate_share)
    rest = np.flatnonzero(keys >= gate_share)
    if n_train < len(rest):
        rest = np.sort(np.random.default_rng(seed).permutation(rest)[:n_train])
    return replay.subset(rest), replay.subset(held)


def weigh_new(new: SliceSet, n_replay: int, share: float, max_repeat: int = 8) -> tuple:
    """The corrected scans' slices repeated so that they are about ``share`` of the training slices next to
    ``n_replay`` replayed ones (at most ``max_repeat`` copies) -> (the SliceSet, copies). Without it a
    16-slice correction is a sixth of a 96-slice replay (a tenth of the shipped 256), and ten epochs
    barely move the model towards it."""
    if not len(new) or not n_replay or share <= 0:
        return new, 1
    k = int(min(max_repeat, max(1, np.ceil(share * n_replay / ((1.0 - share) * len(new))))))
    out = new
    for _ in range(k - 1):
        out = out.extend(new)
    return out, k
