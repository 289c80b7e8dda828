"""The scan-level call: positive or negative, a calibrated probability, and whether infection was found.

The old call was the mean of the 3 most positive slices, so any scan long enough was positive whatever
the slice classifier's specificity (every whole scan tried was called positive with P >= 0.99). Here
every quantity is length-independent:

- the **score** is the mean of the slice classifier's positive probability over the lung slices (slices
  whose lung area is at least ``LUNG_SLICE_FRACTION`` of the largest): a scan with every slice repeated
  twice has the same score;
- the **probability** is that score calibrated (Platt: a logistic fit on the logit of the score) on
  validation scans, stored beside the checkpoint (``<model>.calibration.json``, tied to the checkpoint's
  sha256); without a matching calibration the raw score is reported with ``"calibrated": false``;
- **infection found** when the outlined infection, counted in 3D lesions of at least ``MIN_LESION_ML``,
  reaches the noise floor (``noise_floor_ml``, set on validation negatives); below it the grade is CT-0
  and the report says "no infection found".

``calibrate`` fits the calibration and the floor; ``hybrid-ct scan-check`` (``scan_check.py``) runs
it leave-one-scan-out and writes the table and the reliability plot.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from hybrid_ct.contract import REPORT
from hybrid_ct.files import file_sha256
from hybrid_ct.processing.crop import foreground_box

LUNG_SLICE_FRACTION = 0.1  # a slice is a lung slice from 10 % of the largest lung cross-section
MIN_LESION_ML = 0.5  # smaller 3D infection components are noise (a 1 cm lesion is 0.5 mL)
DEFAULT_FLOOR_ML = 1.0  # used without a calibration file
EPS = 1e-4


@dataclass
class Calibration:
    a: float = 1.0  # P = sigmoid(a * logit(score) + b)
    b: float = 0.0
    noise_floor_ml: float = DEFAULT_FLOOR_ML
    checkpoint_sha256: str = ""
    fitted_on: list = field(default_factory=list)
    calibrated: bool = False

    def probability(self, score: float) -> float:
        s = min(max(float(score), EPS), 1 - EPS)
        return 1.0 / (1.0 + math.exp(-(self.a * math.log(s / (1 - s)) + self.b)))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def calibration_path(checkpoint) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.stem + ".calibration.json")


def load_calibration(checkpoint) -> Calibration:
    """The calibration stored beside ``checkpoint`` if it was fitted on this very file, else the identity."""
    path = calibration_path(checkpoint)
    try:
        data = json.loads(path.read_text())
        cal = Calibration(**data)
    except (OSError, ValueError, TypeError):
        return Calibration()
    if cal.checkpoint_sha256 != file_sha256(checkpoint):
        return Calibration(noise_floor_ml=cal.noise_floor_ml)  # another model's fit: not applied
    return cal


def scan_features(label: np.ndarray, spacing_xyz, slice_prob: np.ndarray, lung_area: np.ndarray) -> dict:
    """Length-independent features of one scan: ``label`` [z, y, x] (contract values), the slice classifier's
    probabilities and the lung area (any unit) of each model slice."""
    vox_ml = float(np.prod(spacing_xyz)) / 1000.0
    lung_area = np.asarray(lung_area, float)
    lung_slices = lung_area >= LUNG_SLICE_FRACTION * lung_area.max() if lung_area.max() > 0 else \
        np.ones(len(lung_area), bool)
    probs = np.asarray(slice_prob, float)[lung_slices]
    box = foreground_box(label > 0, margin=0)  # lesions lie inside the lung: label only its box
    label = label[box] if box is not None else np.zeros((1, 1, 1), np.uint8)
    inf = label == 2
    comp, n = ndimage.label(inf)
    sizes = ndimage.sum_labels(inf, comp, index=np.arange(1, n + 1)) * vox_ml if n else np.zeros(0)
    return {"score": float(probs.mean()) if len(probs) else 0.0, "lung_slices": int(lung_slices.sum()),
            "infection_ml": float(sizes[sizes >= MIN_LESION_ML].sum()), "lesions": int((sizes >= MIN_LESION_ML).sum()),
            "lung_ml": float((label > 0).sum() * vox_ml)}


CALL = REPORT["call"]  # the wording of the scan-level answer (contract.json)


def combine(classifier_positive: bool, infection_found: bool) -> tuple:
    """One coherent scan-level answer from the two heads -> ``(label, text)``: positive
    only when the classifier and the outlined infection agree on it, negative only when both say none,
    else indeterminate -- never "positive" beside "no infection found"."""
    if classifier_positive and infection_found:
        return "positive", CALL["text"]["positive"]
    if not classifier_positive and not infection_found:
        return "negative", CALL["text"]["negative"]
    return "indeterminate", CALL["text"]["indeterminate_outlined" if infection_found else "indeterminate_classifier"]


def decide(features: dict, cal: Calibration) -> dict:
    """The classification block of the report (see docs/CONTRACTS.md). ``label`` is the combined call
    (``combine``); ``classifier_label`` what the classifier alone says (``probability`` >= 0.5)."""
    p = cal.probability(features["score"]) if cal.calibrated else float(features["score"])
    found = features["infection_ml"] >= cal.noise_floor_ml
    label, text = combine(p >= 0.5, bool(found))
    return {"label": label, "probability": p, "calibrated": cal.calibrated,
            "score": features["score"], "infection_found": bool(found),
            "finding": (f"infection outlined: {features['infection_ml']:.1f} mL in {features['lesions']} lesion(s)"
                        if found else "no infection found"),
            CALL["key"]: text, "meaning": CALL["meaning"],
            "classifier_label": "positive" if p >= 0.5 else "negative",
            "infection_ml": features["infection_ml"], "noise_floor_ml": cal.noise_floor_ml,
            "lung_slices": features["lung_slices"]}


def fit_calibration(scores, truths, negatives_ml, checkpoint=None, names=()) -> Calibration:
    """Platt scaling of the score on validation scans, and the noise floor: the largest infection
    volume outlined on a validation scan without infection (``negatives_ml``)."""
    from sklearn.linear_model import LogisticRegression

    s = np.clip(np.asarray(scores, float), EPS, 1 - EPS)
    y = np.asarray(truths, int)
    floor = float(max(negatives_ml)) if len(negatives_ml) else DEFAULT_FLOOR_ML
    if len(set(y.tolist())) < 2:
        return Calibration(noise_floor_ml=max(floor, DEFAULT_FLOOR_ML))
    lr = LogisticRegression(C=1e4).fit(np.log(s / (1 - s))[:, None], y)
    return Calibration(a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]),
                       noise_floor_ml=max(floor, DEFAULT_FLOOR_ML),
                       checkpoint_sha256=file_sha256(checkpoint) if checkpoint else "",
                       fitted_on=list(names), calibrated=True)


SLICE_MIN_MM2 = 50.0  # a slice whose outlined infection covers this many mm^2 is not called negative


def slice_call(cls_prob, infection_mm2, min_mm2: float = SLICE_MIN_MM2, cls_call=None) -> tuple:
    """Per-slice call that agrees with the infection head: a slice whose outlined infection (the label
    map's infection, i.e. probability > 0.5 inside the predicted lung) covers at least ``min_mm2`` is
    called positive whatever the classifier says; the others keep the classifier's call (``cls_call``,
    the firing-rate class; default ``cls_prob >= 0.5``).

    Returns ``(call, score)``: ``call`` 0/1 per slice and a score for ROC curves that keeps the
    classifier's order within each group and ranks every slice with such infection above every slice
    without it that the classifier calls negative: ``0.5 + 0.5 * p`` with infection, ``p`` without
    (so ``score >= 0.5`` is the call when ``cls_call`` is ``p >= 0.5``).

    Not wired into ``Predictor``: ``hybrid-ct evaluate`` scores it beside the classifier alone
    ("Classification per source" in docs/results.md). On the 2026-12-01 shipped model it raised
    sensitivity (Ma Jun, MosMed) but cost most of UCSD's specificity -- the infection head outlines
    infection on most UCSD non-COVID pictures -- and lowered the pooled AUC: it did not help.
    """
    p = np.clip(np.asarray(cls_prob, float), 0.0, 1.0)
    lesion = np.asarray(infection_mm2, float) >= float(min_mm2)
    base = (p >= 0.5) if cls_call is None else np.asarray(cls_call).astype(bool)
    call = (base | lesion).astype(int)
    score = np.where(lesion, 0.5 + 0.5 * p, p)
    return call, score
