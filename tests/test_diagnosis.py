"""The whole-scan call (hybrid_ct.processing.scan_call): it does not grow with the number of slices, it is calibrated
only with the calibration fitted on this very checkpoint, and below the noise floor it says "no
infection found" with grade CT-0."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.processing.scan_call import (Calibration, calibration_path, decide, fit_calibration, load_calibration,
                                 scan_features)
from hybrid_ct.net.model_files import PACKAGED_MODEL


def _toy(n=20):
    label = np.zeros((n, 40, 40), np.uint8)
    label[2:-2, 5:35, 5:35] = 1
    label[8:12, 10:20, 10:20] = 2
    probs = np.linspace(0.1, 0.9, n)
    area = (label > 0).sum(axis=(1, 2))
    return label, probs, area


def test_features_do_not_grow_with_the_number_of_slices():
    label, probs, area = _toy()
    one = scan_features(label, (1.0, 1.0, 2.0), probs, area)
    twice = scan_features(label.repeat(2, axis=0), (1.0, 1.0, 1.0), probs.repeat(2), area.repeat(2))
    assert twice["score"] == pytest.approx(one["score"])
    assert twice["infection_ml"] == pytest.approx(one["infection_ml"])
    assert twice["lung_ml"] == pytest.approx(one["lung_ml"])
    # the old rule (mean of the 3 most positive slices) is not the score: a long scan is not positive by length
    assert one["score"] < np.sort(probs)[-3:].mean()


def test_below_the_noise_floor_no_infection_is_found():
    feats = {"score": 0.3, "infection_ml": 0.8, "lesions": 2, "lung_slices": 10, "lung_ml": 4000.0}
    out = decide(feats, Calibration(noise_floor_ml=1.0))
    assert out["label"] == "negative" and not out["infection_found"] and out["finding"] == "no infection found"
    assert decide({**feats, "infection_ml": 5.0}, Calibration(noise_floor_ml=1.0))["infection_found"]


def test_calibration_is_monotone_and_applies_only_to_its_own_checkpoint(tmp_path):
    scores = [0.05, 0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9, 0.4]
    truths = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    cal = fit_calibration(scores, truths, [0.2, 0.9], ckpt, names=[str(i) for i in range(10)])
    assert cal.calibrated and cal.a > 0 and cal.noise_floor_ml == 1.0
    assert cal.probability(0.1) < cal.probability(0.5) < cal.probability(0.9)
    cal.save(calibration_path(ckpt))
    assert load_calibration(ckpt).calibrated
    ckpt.write_bytes(b"other weights")  # a retrained model: the old fit must not be applied
    assert not load_calibration(ckpt).calibrated


@pytest.mark.slow
def test_the_same_scan_with_every_slice_twice_gets_the_same_call():
    from hybrid_ct.predict.predictor import Predictor
    from hybrid_ct.data.phantom import make_phantom

    if not PACKAGED_MODEL.is_file():
        pytest.skip("the shipped model is not in this checkout")
    predictor = Predictor.from_checkpoint(PACKAGED_MODEL)
    img, _, _ = make_phantom(5002, shape=(32, 160, 160), positive=True)
    arr = sitk.GetArrayFromImage(img)
    twice = sitk.GetImageFromArray(arr.repeat(2, axis=0))
    twice.SetSpacing(img.GetSpacing()[:2] + (img.GetSpacing()[2] / 2,))
    twice.SetOrigin(img.GetOrigin())
    twice.SetDirection(img.GetDirection())
    _, a = predictor.predict(img)
    _, b = predictor.predict(twice)
    assert a["classification"]["label"] == b["classification"]["label"]
    assert abs(a["classification"]["probability"] - b["classification"]["probability"]) < 0.02
    assert a["classification"]["infection_found"] == b["classification"]["infection_found"]
    assert a["grade"] == b["grade"]


def test_one_coherent_call_from_the_two_heads():
    """Issue 27 point 4: never "positive" beside "no infection found"; the wording is the contract's."""
    from hybrid_ct.contract import REPORT
    from hybrid_ct.processing.scan_call import combine

    text = REPORT["call"]["text"]
    feats = {"score": 0.8, "infection_ml": 0.0, "lesions": 0, "lung_slices": 10, "lung_ml": 4000.0}
    cal = Calibration(noise_floor_ml=1.0)
    out = decide(feats, cal)  # the classifier says positive, nothing outlined
    assert out["label"] == "indeterminate" and out["classifier_label"] == "positive"
    assert out["finding"] == "no infection found" and out["call_text"] == text["indeterminate_classifier"]
    out = decide({**feats, "infection_ml": 20.0, "lesions": 3}, cal)
    assert out["label"] == "positive" and out["call_text"] == text["positive"] == "infection pattern found"
    out = decide({**feats, "score": 0.2, "infection_ml": 20.0, "lesions": 3}, cal)
    assert out["label"] == "indeterminate" and out["call_text"] == text["indeterminate_outlined"]
    out = decide({**feats, "score": 0.2}, cal)
    assert out["label"] == "negative" and out["call_text"] == text["negative"]
    for c in (True, False):
        for f in (True, False):
            label, _ = combine(c, f)
            assert label in REPORT["call"]["labels"]
            assert not (label == "positive" and not f) and not (label == "negative" and f)
    assert "COVID" not in text["positive"]
