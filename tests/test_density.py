"""The report's density guard (issue 27, point 3): the parenchyma's median HU and the warning above -750 HU;
and the standardisation that maps a denser scan back to the training level before the network."""
import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.contract import REPORT
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.data.protocol import variant
from hybrid_ct.processing.density import (AIR_HU, MAX_MEDIAN_HU, SOFT_HU, TRAINING_MAX_LEVEL_HU, lung_density,
                                          parenchyma_level, standardise, standardise_shift)


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
        assert set(r["lung_density"]) == {*REPORT["lung_density"]["fields"], *REPORT["lung_density"]["standardise"]["fields"], "note"}
        assert r["classification"]["label"] in REPORT["call"]["labels"]
    assert normal["lung_density"]["warning"] is None
    assert dense["lung_density"]["median_hu"] > normal["lung_density"]["median_hu"] + 100
    assert dense["lung_density"]["warning"] == REPORT["lung_density"]["warning"]
    # the denser scan was mapped back before the network by about its extra density; the normal one not at all
    level = normal["lung_density"]["level_hu"]
    assert normal["lung_density"]["shift_hu"] == standardise_shift(level)
    assert dense["lung_density"]["shift_hu"] == pytest.approx(min(300.0, max(0.0, level + 200 - TRAINING_MAX_LEVEL_HU)), abs=15)
    assert dense["lung_density"]["note"] and str(round(dense["lung_density"]["shift_hu"])) in dense["lung_density"]["note"]


def test_the_level_is_the_parenchyma_mode_not_moved_by_lesions():
    rng = np.random.default_rng(0)
    hu = rng.normal(-860.0, 25.0, (10, 60, 60)).astype(np.float32)
    assert parenchyma_level(hu, None) == pytest.approx(-860, abs=5)
    hu[:, :25] = rng.normal(-500.0, 80.0, (10, 25, 60))  # 40 % of the lung ground glass: the mode stays
    assert parenchyma_level(hu, None) == pytest.approx(-860, abs=10)
    body = np.zeros(hu.shape, bool)
    assert parenchyma_level(hu, body) is None  # nothing inside the body: no level


def test_standardise_is_monotone_keeps_its_landmarks_and_leaves_a_training_level_scan_alone():
    v = np.linspace(-1100.0, 200.0, 1301, dtype=np.float32)
    out = standardise(v, -700.0, 170.0)
    assert np.all(np.diff(out) >= 0)
    assert out[v <= AIR_HU] == pytest.approx(v[v <= AIR_HU]) and out[v >= SOFT_HU] == pytest.approx(v[v >= SOFT_HU])
    assert float(np.interp(-700.0, v, out)) == pytest.approx(-870.0, abs=1)
    assert standardise(v, -900.0, 0.0) is v
    assert standardise_shift(TRAINING_MAX_LEVEL_HU) == 0 and standardise_shift(TRAINING_MAX_LEVEL_HU - 50) == 0
    assert standardise_shift(None) == 0 and standardise_shift(-400.0) == 0  # a lung mostly filled by lesions
    assert standardise_shift(-600.0) == min(-600.0 - TRAINING_MAX_LEVEL_HU, REPORT["lung_density"]["standardise"]["max_shift_hu"])


def test_the_pre_chain_brings_a_denser_phantom_back_to_what_the_network_saw():
    from hybrid_ct.processing.transforms import pre_transforms, run

    img, lab, _ = make_phantom(3, shape=(24, 128, 128), positive=False)
    lung = sitk.GetArrayFromImage(lab) > 0
    dense = variant(img, "dense200", lung)
    x = {k: run(pre_transforms(128, standardise=k != "off"), {"image": im}) for k, im in
         (("base", img), ("on", dense), ("off", dense))}
    base = x["base"]["image"].as_tensor().numpy()
    err = {k: float(np.abs(x[k]["image"].as_tensor().numpy() - base).mean()) for k in ("on", "off")}
    assert err["on"] < 0.35 * err["off"], err  # in the lung window's [0, 1]: most of the +200 HU is undone
    assert x["on"]["density"]["shift_hu"] > 100 and "density" not in x["off"]
    other = run(pre_transforms(128, standardise=-700.0), {"image": dense})["density"]  # another reference level
    assert other["shift_hu"] == pytest.approx(x["on"]["density"]["shift_hu"] - (-700.0 - TRAINING_MAX_LEVEL_HU), abs=0.1)
    assert x["base"]["density"]["shift_hu"] == standardise_shift(x["base"]["density"]["level_hu"])


def test_the_contract_level_is_the_densest_hu_training_volume():
    from hybrid_ct.data.manifest import data_root
    from hybrid_ct.data.sources import training_levels
    from hybrid_ct.train.recipes import load_recipe

    if not (data_root() / "lung3d_imlab").is_dir():
        pytest.skip(f"no real data at {data_root()} (the HU training volumes)")
    spec = load_recipe("shipped")["data"]
    levels = training_levels(data_spec=spec)
    assert len(levels) == 4 + spec["phantoms"] and max(levels.values()) == TRAINING_MAX_LEVEL_HU
