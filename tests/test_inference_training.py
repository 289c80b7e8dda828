"""Predictor (volume in, label in the same geometry + report out), checkpoints, and the training loop."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hybrid_ct.net.checkpoint import load_checkpoint, save_checkpoint
from hybrid_ct.errors import InputError, ModelNotReadyError
from hybrid_ct.predict.predictor import Predictor
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.data.slice_store import MISSING, SliceSet, slices_from_arrays, slices_from_volume
from hybrid_ct.train.config import TrainConfig, epoch_indices
from hybrid_ct.train.scoring import evaluate
from hybrid_ct.train.trainer import fit
from hybrid_ct.split import split_by_group

TINY = dict(levels=3, base_channels=4, fc_hidden=16, time_steps=2, in_size=64)


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom(s, shape=(12, 64, 80), positive=s % 2 == 0) for s in range(4)]


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    """A tiny network trained for a few epochs on phantom slices, saved as a checkpoint."""
    torch.manual_seed(0)
    data = SliceSet.empty(64)
    for i, (img, lab, _) in enumerate(phantoms):
        data = data.extend(slices_from_volume(img, lab, f"ph{i}", size=64))
    model = HybridMultiTaskNet(NetConfig(**TINY))
    hist = fit(model, data, data, TrainConfig(epochs=4, batch_size=8, lr=3e-3, negative_fraction=1.0, augment=False),
               progress=False)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model, {"version": "v-test", "history": hist})
    return path, hist, data


def test_training_reduces_the_loss_and_reports_a_score(trained):
    _, hist, _ = trained
    assert len(hist) == 4
    assert hist[-1]["loss"]["total"] < hist[0]["loss"]["total"]
    assert 0.0 <= hist[-1]["val"]["score"] <= 1.0
    assert set(hist[-1]["val"]["seg"]) == {"lung", "infection"}


def test_checkpoint_round_trip_and_missing_model(trained, tmp_path):
    path, _, data = trained
    model, meta = load_checkpoint(path)
    assert meta["version"] == "v-test" and not model.training
    again = save_checkpoint(tmp_path / "copy.pt", model, meta)
    m2, _ = load_checkpoint(again)
    x = torch.from_numpy(data.images[:2, None].astype(np.float32) / 255)
    with torch.no_grad():
        assert torch.equal(model(x)["lung"], m2(x)["lung"])
    with pytest.raises(ModelNotReadyError, match="no trained model"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotReadyError, match="cannot be loaded"):
        load_checkpoint(tmp_path / "junk.pt")
    assert not list(tmp_path.glob("*.tmp"))


def test_prediction_comes_back_in_the_input_geometry(trained, phantoms):
    path, _, _ = trained
    img, _, _ = phantoms[0]
    # a non-trivial geometry: flipped axis, shifted origin, anisotropic spacing
    img = sitk.Flip(img, [True, False, False])
    img.SetOrigin((12.5, -40.0, 300.0))
    label, report = Predictor.from_checkpoint(path).predict(img)
    assert label.GetSize() == img.GetSize()
    assert label.GetSpacing() == img.GetSpacing() and label.GetOrigin() == img.GetOrigin()
    assert label.GetDirection() == img.GetDirection()
    arr = sitk.GetArrayFromImage(label)
    assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 2, 3, 4}  # right lung 3, left lung 4, infection 2
    assert report["model_version"] == "v-test"
    assert report["classification"]["label"] in ("positive", "negative", "indeterminate")
    assert 0.0 <= report["classification"]["probability"] <= 1.0
    assert len(report["classification"]["slice_positive"]) == img.GetSize()[2]
    assert report["grade"].startswith("CT-")
    assert 0 <= report["burden"]["total_pct"] <= 100
    e = report["energy"]
    assert e["e_hybrid_uj"] > 0 and e["e_conv_uj"] > e["e_hybrid_uj"] and 0 < e["ratio"] < 1
    assert report["label_names"] == {"right_lung": 3, "left_lung": 4, "infection": 2}


def test_predictor_refuses_bad_input(trained):
    path, _, _ = trained
    pred = Predictor.from_checkpoint(path)
    nan = sitk.GetImageFromArray(np.full((4, 64, 64), np.nan, np.float32))
    with pytest.raises(InputError):
        pred.predict(nan)
    water = sitk.GetImageFromArray(np.zeros((4, 64, 64), np.float32))  # no air, no lungs
    with pytest.raises(InputError):
        pred.predict(water)


def test_slice_targets_and_class_rules():
    x = np.zeros((3, 1, 8, 8), np.float32)
    lab = np.zeros((3, 8, 8), np.uint8)
    lab[0, 2:6, 2:6] = 1
    lab[1, 2:6, 2:6] = 2
    s = slices_from_arrays(x, lab, "p1")
    assert s.cls.tolist() == [0, 1, 0] and s.group == ["p1"] * 3
    assert s.lung[1].sum() == 16 and s.infection[1].sum() == 16
    unknown = slices_from_arrays(x, None, "p2", diagnosis=1)
    assert unknown.cls.tolist() == [-1] * 3 and (unknown.lung == MISSING).all()
    neg = slices_from_arrays(x, None, "p3", diagnosis=0)
    assert neg.cls.tolist() == [0] * 3


def test_negatives_are_subsampled_per_epoch():
    cls = np.array([1] * 10 + [0] * 100, np.int8)
    data = SliceSet(np.zeros((110, 4, 4), np.uint8), np.zeros((110, 4, 4), np.uint8),
                    np.zeros((110, 4, 4), np.uint8), cls, ["g"] * 110)
    rng = np.random.default_rng(0)
    a, b = epoch_indices(data, 0.2, rng), epoch_indices(data, 0.2, rng)
    assert len(a) == len(b) == 30
    assert set(range(10)) <= set(a.tolist()) and set(a.tolist()) != set(b.tolist())


def test_split_by_group_is_disjoint_and_stable():
    groups = [f"patient{i // 5}" for i in range(100)]
    tr, va = split_by_group(groups, 0.2, seed=1)
    assert tr and va and not {groups[i] for i in tr} & {groups[i] for i in va}
    assert (tr, va) == split_by_group(groups, 0.2, seed=1)
    assert sorted(tr + va) == list(range(100))


def test_evaluate_on_partial_targets(trained):
    path, _, data = trained
    model, _ = load_checkpoint(path)
    part = data.subset(range(8))
    part.lung[:] = MISSING
    res = evaluate(model, part)
    assert res["seg"]["lung"]["n_cases"] == 0 and "accuracy" in res["cls"]


def test_keep_lung_components_drops_specks_but_keeps_both_lungs():
    from hybrid_ct.processing.postprocess import keep_lung_components

    lab = np.zeros((6, 40, 40), np.uint8)
    lab[1:5, 5:30, 3:15] = 1  # right lung
    lab[1:5, 5:30, 22:36] = 1  # left lung (separate component)
    lab[2, 10:14, 25:29] = 2  # infection inside the left lung
    lab[0, 36:39, 36:39] = 2  # a speck on the table
    out = keep_lung_components(lab)
    assert out[0, 36:39, 36:39].sum() == 0
    assert np.array_equal(out[1:5], lab[1:5])
    assert np.array_equal(keep_lung_components(np.zeros_like(lab)), np.zeros_like(lab))


def test_keep_lung_components_drops_air_outside_the_body():
    from hybrid_ct.processing.postprocess import keep_lung_components

    lab = np.zeros((6, 40, 40), np.uint8)
    lab[1:5, 5:25, 3:36] = 1  # the lungs, inside the body
    lab[1:5, 32:38, 5:35] = 2  # "infected lung" in the gap between the back and the table: 27 % of the lungs
    body = np.zeros_like(lab, bool)
    body[:, 2:30, 1:39] = True
    out = keep_lung_components(lab, body=body)
    assert out[:, 32:38].sum() == 0 and np.array_equal(out[:, :30], lab[:, :30])
    # a body mask that misses the largest component (a failed mask, e.g. a tight crop) is ignored
    assert np.array_equal(keep_lung_components(lab, body=~body), lab)
    # a picture cropped through the lungs: the second lung reaches the border, the body outline (the
    # mediastinum and the other lung) does not hold it -- it is kept
    crop = np.zeros((1, 40, 40), np.uint8)
    crop[0, 5:35, 0:12] = 1  # right lung (the smaller), cut by the crop at the left border
    crop[0, 5:35, 22:36] = 1  # left lung, inside the body outline
    inner = np.zeros_like(crop, bool)
    inner[0, 3:38, 15:39] = True
    assert np.array_equal(keep_lung_components(crop, body=inner), crop)
    # in a volume a component outside the body that reaches the border is the table or a blanket: dropped
    table = lab.copy()
    table[:, 37:40, :] = 1
    assert np.array_equal(keep_lung_components(table, body=body), out)


def test_keep_lung_components_drops_neck_air_joined_to_the_lungs():
    """The air in front of the neck at the top of a scan, read as lung and joined to the apices (one
    3D component, mostly inside the body): dropped slice by slice where it is outside the body."""
    from hybrid_ct.processing.postprocess import keep_lung_components

    lab = np.zeros((6, 40, 40), np.uint8)
    lab[0:5, 10:30, 5:35] = 1  # the lungs
    lab[4:6, 2:11, 15:25] = 2  # top slices: "infected lung" from the air in front of the neck into the body
    body = np.zeros_like(lab, bool)
    body[:, 5:35, 2:38] = True
    out = keep_lung_components(lab, body=body)
    assert out[:, 2:5].sum() == 0  # outside the body: gone
    assert np.array_equal(out[:, 5:], lab[:, 5:])  # the lungs and everything inside the body: untouched
    # the same piece reaching the image border is a crop through the lungs: kept
    cropped = lab.copy()
    cropped[4:6, 0:2, 15:25] = 2
    assert np.array_equal(keep_lung_components(cropped, body=body), cropped)


def test_body_mask_in_the_images_own_layout(small_phantom):
    import SimpleITK as sitk

    from hybrid_ct.imaging.body import body_mask

    img = small_phantom[0]
    hu = sitk.GetArrayFromImage(img)
    body = body_mask(img)
    assert body.shape == hu.shape
    assert not body[:, 0, 0].any()  # the room's air in the corner
    assert body[hu > 0].mean() > 0.99  # tissue is inside
    assert body[hu < -500].any()  # and so are the lungs (holes filled)
    flipped = sitk.Flip(img, [True, False, True])  # another index layout of the same patient
    assert np.array_equal(body_mask(flipped), sitk.GetArrayFromImage(sitk.Flip(
        sitk.GetImageFromArray(body.astype(np.uint8)), [True, False, True])).astype(bool))


def test_recalibrate_batchnorm_re_estimates_statistics_from_the_data(trained):
    from hybrid_ct.train.scoring import recalibrate_batchnorm

    _, _, data = trained
    model = HybridMultiTaskNet(NetConfig(**TINY))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert recalibrate_batchnorm(model, data, n_slices=16, batch_size=8) == 16
    first = [m.running_mean.clone() for m in bns]
    assert not model.training and all(m.momentum == 0.1 for m in bns)  # momentum restored, eval mode
    assert any(f.abs().sum() > 0 for f in first)  # the fresh statistics (zeros) were replaced
    for m in bns:  # stale statistics from elsewhere are forgotten, not averaged in
        m.running_mean.fill_(5.0)
    recalibrate_batchnorm(model, data, n_slices=16, batch_size=8)
    for f, m in zip(first, bns):
        torch.testing.assert_close(m.running_mean, f)


def test_the_app_builds_its_train_config_with_the_same_defaults_and_loss_weights(tmp_path):
    import sys
    from dataclasses import replace
    from pathlib import Path

    app_dir = str(Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct")
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    from lib.store import ModelStore
    from lib.trainers.hybrid_ct import FINE_TUNE_LR, HybridCTTrain
    from lib.trainers.params import train_config
    from lib.validation import BadRequest

    req = HybridCTTrain(ModelStore(tmp_path)).config()
    # what /info shows: TrainConfig's defaults, but a retrain fine-tunes at a tenth of the training rate
    assert FINE_TUNE_LR == TrainConfig().lr / 10
    assert train_config(req, "cpu") == replace(TrainConfig(), val_batch_size=8, lr=FINE_TUNE_LR)
    assert train_config({}, "cpu") == TrainConfig()
    cfg = train_config(dict(req, lambda_infection="3", max_iters_per_epoch=0), "cpu")
    assert cfg.lambdas == {"cls": 1.0, "lung": 1.0, "infection": 3.0} and cfg.max_iters_per_epoch is None
    for bad in (0, -1, "x", None, True, float("inf")):
        with pytest.raises(BadRequest, match="lambda_cls"):
            train_config({"lambda_cls": bad}, "cpu")


def test_trainer_stops_when_asked_and_never_trains_on_a_batch_of_one(trained):
    from hybrid_ct.train.trainer import Trainer

    _, _, data = trained
    one = data.subset([int(np.flatnonzero(data.cls == 1)[0])])
    seen = []
    model = HybridMultiTaskNet(NetConfig(**TINY))
    t = Trainer(model, TrainConfig(epochs=3, batch_size=4, augment=False), one, one,
                on_epoch=lambda epoch, stats, m: seen.append(stats["train_slices"]), stop=lambda: len(seen) >= 2)
    hist = t.fit()
    assert len(hist) == 2 and seen == [2, 2] and t.stopped  # the single slice twice: BatchNorm needs 2
    assert t.best_epoch in (1, 2) and t.best_model() is not None


def test_learning_rate_follows_the_time_budget_when_one_is_given(trained):
    """A run a wall-clock budget stops early must still anneal: with ``spent`` the cosine follows the larger of
    the epochs' progress and the clock's; without it, the epochs' (the CLI's schedule, unchanged)."""
    import math
    from dataclasses import replace

    from hybrid_ct.train.trainer import Trainer

    _, _, data = trained
    one = data.subset([int(np.flatnonzero(data.cls == 1)[0])])  # one batch per epoch: the step sees it = 0
    cfg = TrainConfig(epochs=10, batch_size=4, augment=False, lr=1e-3)
    t = Trainer(HybridMultiTaskNet(NetConfig(**TINY)), replace(cfg, epochs=2), one, spent=lambda: 0.75)
    t.fit()  # epoch 2's only step: the epochs say 0.5, the clock 0.75
    assert t.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    t = Trainer(HybridMultiTaskNet(NetConfig(**TINY)), replace(cfg, epochs=2), one, spent=lambda: 0.1)
    t.fit()
    assert t.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    frozen = Trainer(HybridMultiTaskNet(NetConfig(**TINY)), replace(cfg, epochs=1), one, spent=lambda: 1.0)
    before = {k: v.clone() for k, v in frozen.model.state_dict().items() if v.dtype.is_floating_point}
    frozen.fit()  # budget spent: rate 0, so the weights do not move (BatchNorm statistics still do)
    after = frozen.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k)
    plain = Trainer(HybridMultiTaskNet(NetConfig(**TINY)), replace(cfg, epochs=2), one)
    plain.fit()  # the per-epoch scheduler: after 2 of 2 epochs the cosine is at its end
    assert plain.opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
