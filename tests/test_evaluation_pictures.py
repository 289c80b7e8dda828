"""Issue 19, the picture path: leave-one-source-out training, the orientation check, the slice call that
agrees with the infection head, the per-source operating points (hybrid_ct.evaluate.pictures, evaluation)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.contract import LABELS, SIDES
from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.cli import main


# ----------------------------------------------------------------------------------------------------
# leave-one-source-out

def test_hold_out_source_never_reaches_training(shared_data, tmp_path, monkeypatch):
    """A smoke run with --hold-out-source mosmed --twin-only: no MosMed group in what ``fit`` trains on,
    every MosMed group in the stored validation split; then ``evaluate --loso`` scores it on MosMed."""
    import hybrid_ct.train.build as T  # the build calls the trainer's fit
    from hybrid_ct.data.manifest import group_family

    seen = []
    real_fit = T.fit

    def spy(model, train, val, cfg, **kw):
        seen.append(list(train.group))
        return real_fit(model, train, val, cfg, **kw)

    monkeypatch.setattr(T, "fit", spy)
    out = tmp_path / "loso_mosmed.pt"
    rc = main(["-q", "train", "--recipe", "quick", "--data", str(shared_data), "--out", str(out), "--twin-only",
               "--hold-out-source", "mosmed", "--sources", "cls2d", "--limit", "12", "--phantoms", "0",
               "--epochs", "1", "--max-iters", "1"])
    assert rc == 0 and len(seen) == 1  # the twin only: one network trained
    assert seen[0] and not any(group_family(g) == "mosmed" for g in seen[0])
    model, meta = load_checkpoint(out)
    assert meta["kind"] == "cnn_twin" and meta["recipe"]["data"]["hold_out"] == "mosmed"
    assert meta["split"]["hold_out"] == "mosmed"
    labelled = _labelled_groups(shared_data, meta)  # one entry per class-labelled slice
    mosmed = [g for g in labelled if group_family(g) == "mosmed"]
    assert mosmed and set(mosmed) <= set(meta["val_groups"])

    from hybrid_ct.evaluate.pictures import loso_results

    rows = loso_results([out], data=shared_data, progress=False)
    assert [r["collection"] for r in rows] == ["mosmed"] and rows[0]["hold_out"] == "mosmed"
    assert rows[0]["metrics"]["n"] == len(mosmed)  # every MosMed slice, not the validation share of them

    assert main(["-q", "train", "--recipe", "quick", "--data", str(shared_data), "--out", str(out), "--twin-only",
                 "--no-twin", "--sources", "cls2d", "--limit", "2", "--phantoms", "0"]) == 2


def _labelled_groups(root, meta):
    from hybrid_ct.train.recipes import load_recipe_data

    sets = load_recipe_data(meta["recipe"], root, meta["net"]["in_size"], progress=False)
    return [g for s in sets for g, c in zip(s.slices.group, s.slices.cls) if c >= 0]


def test_held_out_groups_names_what_exists():
    from hybrid_ct.data.slice_store import SourceSet
    from hybrid_ct.errors import InputError
    from hybrid_ct.train.recipes import held_out_groups
    from hybrid_ct.data.slice_store import SliceSet

    z = np.zeros((3, 4, 4), np.uint8)
    s = SourceSet("cls2d", SliceSet(z, z, z, np.ones(3, np.int8), ["ucsd_1", "mosmed_2", "majun20_coronacases_001"]))
    assert held_out_groups([s], "majun20") == {"majun20_coronacases_001"}
    with pytest.raises(InputError, match="ucsd"):
        held_out_groups([s], "nowhere")


# ----------------------------------------------------------------------------------------------------
# orientation: the geometry of the product path, not the model's accuracy

def _picture(h=56, w=64):
    """A non-square, asymmetric chest-like picture in HU with 1 mm pixels (one slice): soft tissue, two
    lungs of different size and height, a very dark blob in one of them (no symmetry maps it onto itself)."""
    yy, xx = np.mgrid[:h, :w]
    arr = np.full((h, w), 40.0, np.float32)
    arr[((yy - 24) / 16) ** 2 + ((xx - 20) / 11) ** 2 < 1] = -950
    arr[((yy - 32) / 12) ** 2 + ((xx - 46) / 8) ** 2 < 1] = -950
    arr[((yy - 18) / 4) ** 2 + ((xx - 16) / 5) ** 2 < 1] = -1300
    out = sitk.GetImageFromArray(arr[None])
    out.SetSpacing((1.0, 1.0, 1.0))
    return out


@pytest.mark.parametrize("angle", [90, 180, 270])
def test_rotating_the_input_rotates_the_label_map(model_path, angle):
    """A stand-in network that marks dark pixels as lung (and the darkest as infection) is rotation-
    equivariant: through ``Predictor.predict`` (reorientation, square padding, resampling and back) the
    label of the rotated picture must be the rotated label of the upright one."""
    from hybrid_ct.predict.predictor import Predictor, SliceOutputs
    from hybrid_ct.evaluate.pictures import rotate_image, rotate_mask

    model, meta = load_checkpoint(model_path)
    pred = Predictor(model, meta, require_chest=False)

    def threshold_net(x, meter=None):
        n = len(x)
        return SliceOutputs((x < 0.3).astype(np.float32), (x < 0.1).astype(np.float32), np.full(n, 0.5),
                            np.zeros(n, int), np.zeros((n, 2)))

    pred.run_slices = threshold_net
    img = _picture()
    up, _ = pred.predict(img)
    turned, _ = pred.predict(rotate_image(img, angle))
    # the lung sides follow the picture's own x axis (a picture has no patient geometry), so a turned picture
    # may swap them: compared with the sides merged
    unsided = lambda lab: np.where(np.isin(lab, list(SIDES.values())), LABELS["lung"], lab)  # noqa: E731
    a = unsided(sitk.GetArrayFromImage(turned)[0])
    b = rotate_mask(unsided(sitk.GetArrayFromImage(up)[0]), angle)
    assert a.shape == b.shape
    assert (a == LABELS["lung"]).any() and (a == LABELS["infection"]).any() and (a == b).mean() > 0.995
    wrong = rotate_mask(unsided(sitk.GetArrayFromImage(up)[0]), angle + 180)  # the picture is not symmetric
    assert (a != wrong).mean() > 0.02


def test_orientation_check_reports_every_angle(model_path):
    from hybrid_ct.predict.predictor import Predictor
    from hybrid_ct.evaluate.pictures import orientation_check

    model, meta = load_checkpoint(model_path)
    img = _picture()
    arr = sitk.GetArrayFromImage(img)[0]
    lung = arr < -400
    inf = np.zeros_like(lung)
    inf[20:30, 10:20] = True
    res = orientation_check(Predictor(model, meta, require_chest=False), [("p", img, inf, lung | inf)])
    assert set(res["angles"]) == {"0", "90", "180", "270"} and res["pictures"] == 1
    for v in res["angles"].values():
        assert v["infection_n"] == 1 and v["lung_n"] == 1 and v["refused"] == 0
        assert 0 <= v["infection_dice"] <= 1 and 0 <= v["lung_dice"] <= 1
    assert res["max_gap_infection_dice"] >= 0


# ----------------------------------------------------------------------------------------------------
# slice call, operating points

def test_slice_call_agrees_with_the_infection_head():
    from hybrid_ct.processing.scan_call import slice_call

    p = np.array([0.1, 0.1, 0.7, 0.4, 0.9])
    mm2 = np.array([0.0, 80.0, 0.0, 49.0, 200.0])
    call, score = slice_call(p, mm2, min_mm2=50)
    assert call.tolist() == [0, 1, 1, 0, 1]
    assert ((score >= 0.5) == call.astype(bool)).all()
    assert score[1] < score[4] and score[0] == pytest.approx(0.1)  # order kept within each group
    call, _ = slice_call(p, mm2, 50, cls_call=[1, 0, 0, 0, 0])  # the firing-rate class, not p >= 0.5
    assert call.tolist() == [1, 1, 0, 0, 1]


def test_sensitivity_at_specificity():
    from hybrid_ct.train.metrics import rates_at_threshold, sensitivity_at_specificity

    y = np.array([0] * 20 + [1] * 10)
    s = np.concatenate([np.linspace(0, 0.6, 20), np.linspace(0.3, 1.0, 10)])
    op = sensitivity_at_specificity(y, s, 0.85)
    assert op["specificity"] >= 0.85
    r = rates_at_threshold(y, s, op["threshold"])
    assert r["sensitivity"] == pytest.approx(op["sensitivity"]) and r["specificity"] == pytest.approx(op["specificity"])
    assert np.isnan(sensitivity_at_specificity(np.ones(4), np.arange(4.0))["sensitivity"])


def test_evaluate_sets_scores_the_agreeing_call_and_the_operating_points(model_path):
    from hybrid_ct.data.slice_store import SourceSet
    from hybrid_ct.evaluate.validation import evaluate_sets
    from hybrid_ct.evaluate.results_doc import _loso_block, _orientation_block, _sources_block
    from hybrid_ct.data.slice_store import MISSING, SliceSet

    model, _ = load_checkpoint(model_path)
    rng = np.random.default_rng(1)
    n, s = 8, model.cfg.in_size
    groups = ["mosmed_1", "mosmed_2", "ucsd_3", "ucsd_4", "mosmed_5", "ucsd_6", "majun20_coronacases_001", "ucsd_7"]
    pics = SliceSet(rng.integers(0, 255, (n, s, s), dtype=np.uint8), np.full((n, s, s), MISSING, np.uint8),
                    np.full((n, s, s), MISSING, np.uint8), np.array([0, 1, 0, 1, 1, 0, 1, 1], np.int8), groups)
    res = evaluate_sets(model, [SourceSet("cls2d", pics)], progress=False, pixel_mm2={"cls2d": np.full(n, 4.0)},
                        min_lesion_mm2=0.0)  # any outlined pixel is "enough": every slice agreeing-positive
    assert set(res["cls"]) == {"cls2d", "cls2d/mosmed", "cls2d/ucsd", "cls2d/majun20", "real", "all"}
    assert set(res["cls_agree"]) == set(res["cls"]) - {"all"}  # pooled over real pictures only
    for kind in ("cls", "cls_agree"):
        for key, m in res[kind].items():
            assert "at_spec" in m and "at_real_threshold" in m, (kind, key)
    assert res["cls_agree"]["real"]["n"] == res["cls"]["real"]["n"] == n
    assert res["cls_agree"]["real"]["sensitivity"] >= res["cls"]["real"]["sensitivity"]
    text = _sources_block({"hybrid": res})
    assert "UCSD COVID-CT" in text and "| agreeing |" in text and "classifier only -> agreeing" in text
    res["orientation"] = {"pictures": 2, "max_gap_infection_dice": 0.1, "max_gap_lung_dice": 0.0, "angles": {
        a: {"infection_dice": 0.5, "infection_n": 2, "lung_dice": 0.9, "lung_n": 2, "refused": 0, "called_positive": 1}
        for a in ("0", "90", "180", "270")}}
    assert "| hybrid | 270 deg | 0.500 (2) | 0.900 (2) | 0 | 1 / 2 |" in _orientation_block({"hybrid": res})
    row = {"path": "runs/loso_ucsd.pt", "kind": "cnn_twin", "iterations": 3, "hold_out": "ucsd", "collection": "ucsd",
           "metrics": dict(res["cls"]["cls2d/ucsd"], at_spec={"sensitivity": 0.5})}
    assert "| **UCSD COVID-CT** | UCSD COVID-CT | 4 (2) |" in _loso_block([row], {"hybrid": res})


def test_medseg_pictures_and_picture_pixel_areas(shared_data):
    from PIL import Image

    from hybrid_ct.data.slice_store import SourceSet
    from hybrid_ct.evaluate.pictures import medseg_pictures, picture_pixel_mm2
    from hybrid_ct.data.slice_store import SliceSet

    items = medseg_pictures(shared_data, {"medseg_slice_0"})
    assert len(items) == 1
    name, img, inf, lung = items[0]
    assert name == "seg2d_medseg/images/0.jpg" and inf.any() and (lung >= inf).all()
    assert inf.shape == lung.shape == sitk.GetArrayViewFromImage(img).shape[1:]
    files = ["seg2d_medseg/images/0.jpg", "lung3d_imlab/none.nii.gz"]
    z = np.zeros((1, 8, 8), np.uint8)
    one = SourceSet("medseg", SliceSet(z, z, z, np.ones(1, np.int8), ["g"]), files=files[:1])
    with Image.open(shared_data / files[0]) as im:
        assert picture_pixel_mm2(shared_data, one, 128)[0] == pytest.approx((max(im.size) / 128) ** 2)
    other = SourceSet("imlab", SliceSet(z, z, z, np.ones(1, np.int8), ["g"]), files=files[1:])
    assert picture_pixel_mm2(shared_data, other, 128) is None
