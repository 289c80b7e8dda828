"""The report's density guard (issue 27, point 3): the parenchyma's median HU and the warning above -750 HU."""
import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.contract import REPORT
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.data.protocol import variant
from hybrid_ct.processing.density import MAX_MEDIAN_HU, lung_density


def test_median_of_the_parenchyma_without_infection():
    hu = np.full((4, 40, 40), -850.0, np.float32)
    label = np.zeros(hu.shape, np.uint8)
    label[:, 5:35, 5:35] = 1
    label[:, 5:20, 5:35] = 2
    hu[label == 2] = 0.0  # infection: left out of the median
    d = lung_density(hu, label)
    assert d["median_hu"] == -850.0 and d["warning"] is None and d["max_median_hu"] == MAX_MEDIAN_HU == -750
    d = lung_density(hu + 200.0 * (label == 1), label)
    assert d["median_hu"] == -650.0 and d["warning"] == REPORT["lung_density"]["warning"]
    assert "expiration or free-breathing" in d["warning"]
    assert lung_density(hu, np.zeros_like(label))["median_hu"] is None
    with pytest.raises(ValueError):
        lung_density(hu[:2], label)


def test_a_denser_variant_of_a_phantom_is_flagged():
    img, lab, _ = make_phantom(5, shape=(16, 96, 96), positive=False)
    label = sitk.GetArrayFromImage(lab)
    base = lung_density(sitk.GetArrayFromImage(img), label)
    dense = lung_density(sitk.GetArrayFromImage(variant(img, "dense200", label > 0)), label)
    assert dense["median_hu"] - base["median_hu"] == pytest.approx(200, abs=30)
    if base["median_hu"] <= MAX_MEDIAN_HU - 60:
        assert base["warning"] is None
    assert dense["warning"] is not None


def test_the_served_report_states_the_density_and_warns_on_a_denser_scan():
    from hybrid_ct.net.model_files import default_model_path
    from hybrid_ct.predict.predictor import Predictor

    img, lab, _ = make_phantom(5, shape=(24, 128, 128), positive=False)
    p = Predictor.from_checkpoint(default_model_path())
    _, normal = p.predict(img)
    dense_img = variant(img, "dense200", sitk.GetArrayFromImage(lab) > 0)
    _, dense = p.predict(dense_img)
    for r in (normal, dense):  # the old keys are all there; lung_density is added
        assert {"classification", "burden", "grade", "energy", "latency_s", "model_version", "label_names"} <= set(r)
        assert set(r["lung_density"]) == set(REPORT["lung_density"]["fields"])
        assert r["classification"]["label"] in REPORT["call"]["labels"]
    assert normal["lung_density"]["warning"] is None
    assert dense["lung_density"]["median_hu"] > normal["lung_density"]["median_hu"] + 100
    assert dense["lung_density"]["warning"] == REPORT["lung_density"]["warning"]
