"""The app's building blocks without a server: model versions (atomic publish, roll back), label
remapping by name, id checks, the fixed validation split, train params, and the multi-process
(DDP) training path on CPU with the gloo backend."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

import pytest
import SimpleITK as sitk
import torch

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib.store import SHIPPED, ModelStore, UnknownVersionError  # noqa: E402
from lib.trainers.data import is_validation_image  # noqa: E402
from lib.trainers.params import PROMOTE_METRICS, validate_params  # noqa: E402
from lib.trainers.promotion import promotion_decision  # noqa: E402
from lib.validation import (BadRequest, canonical_name, canonicalise_label, check_id, check_tag,  # noqa: E402
                            parse_label_info)

from hybrid_ct.contract import FOREGROUND  # noqa: E402
from hybrid_ct.net.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from hybrid_ct.errors import InputError, ModelNotReadyError  # noqa: E402
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig  # noqa: E402

TINY = dict(levels=2, base_channels=2, fc_hidden=4, time_steps=1, in_size=16)


def _net(seed=0):
    torch.manual_seed(seed)
    return HybridMultiTaskNet(NetConfig(**TINY))


def test_versions_publish_roll_back_and_no_model(tmp_path):
    store = ModelStore(tmp_path / "model")
    with pytest.raises(ModelNotReadyError, match="no trained model yet"):
        store.resolve()
    assert store.versions() == [] and store.current() is None

    save_checkpoint(store.shipped, _net(0), {"version": "release-1", "metric": 0.5})
    assert store.current() == SHIPPED and store.versions()[0]["metric"] == 0.5
    v1 = store.publish(_net(1), {"metric": 0.6})
    v2 = store.publish(_net(2), {"metric": 0.7})
    assert (v1, v2) == ("v0001", "v0002") and store.current() == v2
    assert [v["version"] for v in store.versions()] == [SHIPPED, v1, v2]
    assert store.entry(v2)["parent"] == v1 and store.entry(v2)["metric"] == 0.7
    _, meta = load_checkpoint(store.path(v2))
    assert meta["version"] == v2 and meta["metric"] == 0.7

    key_before = store.resolve()[2]
    assert store.rollback(v1) == {"current": v1, "previous": v2}
    assert store.current() == v1 and store.resolve()[2] != key_before
    assert store.rollback(SHIPPED)["current"] == SHIPPED
    with pytest.raises(UnknownVersionError):
        store.rollback("v0042")
    with pytest.raises(UnknownVersionError):
        store.rollback("../../etc/passwd")
    store.path(v2).write_bytes(b"corrupt")  # never point at a checkpoint that does not load
    with pytest.raises(ModelNotReadyError):
        store.rollback(v2)
    assert store.current() == SHIPPED
    assert not [p for p in store.dir.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"

    store.write_stats({"loss": float("nan"), "history": [{"loss": float("inf"), "score": 0.5}]})
    assert "NaN" not in store.stats_path.read_text() and "Infinity" not in store.stats_path.read_text()
    assert store.read_stats() == {"loss": None, "history": [{"loss": None, "score": 0.5}]}


def test_a_claimed_version_number_is_never_overwritten(tmp_path):
    store = ModelStore(tmp_path)
    v1 = store.publish(_net(1), {})
    (store.versions_dir / "v0002.pt").write_bytes(b"someone else's")  # a concurrent publisher got there first
    v = store.publish(_net(2), {})
    assert v == "v0003" and (store.versions_dir / "v0002.pt").read_bytes() == b"someone else's"
    assert store.current() == v and v1 == "v0001"


def test_a_version_published_without_make_current_is_kept_not_served(tmp_path):
    store = ModelStore(tmp_path)
    save_checkpoint(store.shipped, _net(0), {"metric": 0.5})
    assert not store.pointer.exists() and store.current() == SHIPPED
    kept = store.publish(_net(1), {"metric": 0.4, "promotion": {"decision": "kept"}}, make_current=False)
    assert store.current() == SHIPPED, "the newest-version fallback must not serve a kept version"
    assert store.entry(kept)["promotion"] == {"decision": "kept"} and store.entry(kept)["parent"] == SHIPPED
    assert store.versions()[-1]["version"] == kept
    assert store.rollback(kept)["current"] == kept  # a kept version can still be served by hand

    empty = ModelStore(tmp_path / "empty", shipped=None)
    only = empty.publish(_net(2), {}, make_current=False)
    assert empty.current() == only, "with no model at all the new version is the only one to serve"


def test_a_pending_version_is_served_only_once_judged(tmp_path):
    """Published ``pending`` (nothing held out to judge it on): not served, not a start-up fallback; the
    judgement (``store.judge``) records the decision in its sidecar and serves it when promoted."""
    store = ModelStore(tmp_path)
    save_checkpoint(store.shipped, _net(0), {"metric": 0.5})
    v1 = store.publish(_net(1), {"promotion": {"decision": "promoted"}})
    v2 = store.publish(_net(2), {"promotion": {"decision": "pending"}, "trained_ids": ["a"]}, make_current=False)
    assert store.current() == v1 and store.meta(v2)["trained_ids"] == ["a"] and store.meta(SHIPPED) == {}
    store.pointer.write_text("v00x1 garbage\n")
    assert store.recover()["current"] == v1, "a garbage pointer must fall back to the last promoted, not a pending one"
    store.judge(v2, {"decision": "kept", "judged_on": ["b"]}, make_current=False)
    assert store.current() == v1 and store.entry(v2)["promotion"] == {"decision": "kept", "judged_on": ["b"]}
    store.judge(v2, {"decision": "promoted", "judged_on": ["b"]}, make_current=True)
    assert store.current() == v2 and store.meta(v2)["sha256"], "the sidecar keeps the rest of its metadata"


def test_ids_and_tags():
    for ok in ("phantom_000", "slicer flow 1a2b", "P-001.v2", "_x"):
        assert check_id(ok) == ok
    for bad in ("../x", "/abs", "a/b", "a\\b", "..", ".hidden", "", " lead", "trail ", "x" * 300, "a\x00b", None):
        with pytest.raises(BadRequest):
            check_id(bad)
    assert check_tag("final") == "final"
    for bad in ("../final", "fi/nal", "", "a b"):
        with pytest.raises(BadRequest):
            check_tag(bad)


def test_label_names_are_matched_not_positions():
    assert canonical_name("Lungs") == "lung" and canonical_name("lung_left") == "left_lung"
    assert canonical_name("Right Lung") == "right_lung"
    assert canonical_name("GGO") == "infection" and canonical_name("Ground glass opacity") == "infection"
    assert canonical_name("COVID-19") == "infection" and canonical_name("heart") is None
    assert parse_label_info([{"name": "a", "idx": 3}, {"name": "b", "value": 4}]) == {3: "a", 4: "b"}
    assert parse_label_info({"lung": 2, "infection": 1}) == {2: "lung", 1: "infection"}
    for bad in ([{"idx": 1}], [{"name": "a", "idx": "x"}], [{"name": "a", "idx": 1.5}], "nope", 5,
                [{"name": "a", "idx": 1}, {"name": "b", "idx": 1}]):
        with pytest.raises(BadRequest):
            parse_label_info(bad)


def test_canonicalise_label_remaps_by_name(tmp_path):
    ref = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16) - 1000)
    ref.SetSpacing((0.7, 0.7, 2.5))
    ref.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(ref, str(tmp_path / "img.nii.gz"))
    arr = np.zeros((3, 8, 8), np.uint8)
    arr[:, 2:6, 2:6] = 4  # lung
    arr[:, 3:4, 3:4] = 9  # infection
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(ref)
    sitk.WriteImage(lab, str(tmp_path / "lab.nrrd"))
    out, info, warnings = canonicalise_label(str(tmp_path / "lab.nrrd"), str(tmp_path / "img.nii.gz"),
                                             [{"name": "Infection", "idx": 9}, {"name": "Lungs", "idx": 4},
                                              {"name": "Ruler", "idx": 17}])
    got = sitk.GetArrayFromImage(out)
    assert got.dtype == np.uint8 and (got == 2).sum() == 3 and (got == 1).sum() == 3 * 16 - 3
    assert info == [{"name": n, "idx": v} for n, v in FOREGROUND.items()] and "Ruler" in warnings[0]
    assert np.allclose(out.GetOrigin(), ref.GetOrigin()) and np.allclose(out.GetSpacing(), ref.GetSpacing())
    with pytest.raises(InputError, match="unknown values"):
        canonicalise_label(str(tmp_path / "lab.nrrd"), str(tmp_path / "img.nii.gz"))


def test_validation_split_is_fixed_per_image():
    ids = [f"patient_{i:04d}" for i in range(2000)]
    val = [i for i in ids if is_validation_image(i, 0.2)]
    assert 0.15 < len(val) / len(ids) < 0.25
    assert val == [i for i in ids if is_validation_image(i, 0.2)]  # stable across calls / runs
    more = ids + [f"new_{i}" for i in range(500)]  # new images never move the old ones
    assert [i for i in more if is_validation_image(i, 0.2) and i in ids] == val


def test_train_params_are_type_checked():
    assert validate_params({"max_epochs": "3", "pretrained": "false", "learning_rate": 0.01}) == \
        {"max_epochs": 3, "pretrained": False, "learning_rate": 0.01}
    for bad in ({"max_epochs": 0}, {"max_epochs": 2.5}, {"max_epochs": True}, {"val_split": 0.95},
                {"negative_fraction": float("nan")}, {"augment": "maybe"}, {"learning_rate": []}, {"gpus": "0;x"},
                {"promote_tolerance": -0.1}, {"promote_tolerance": 2}, {"force_promote": "perhaps"}):
        with pytest.raises(BadRequest):
            validate_params(bad)


def test_promote_params_are_checked():
    assert validate_params({"promote_metrics": "score", "force_promote": "true", "promote_tolerance": "0.02"}) == \
        {"promote_metrics": ["score"], "force_promote": True, "promote_tolerance": 0.02}
    assert validate_params({"promote_metrics": " lung_dice, cls_auc ,lung_dice"})["promote_metrics"] == \
        ["lung_dice", "cls_auc"]
    assert validate_params({"promote_metrics": ["infection_dice"]})["promote_metrics"] == ["infection_dice"]
    for bad in ("dice", "", [], ["score", 3], {"score": 1}, 5, "score,accuracy"):
        with pytest.raises(BadRequest, match="promote_metrics must name one or more of") as e:
            validate_params({"promote_metrics": bad})
        assert all(name in str(e.value) for name in PROMOTE_METRICS)


def test_promotion_decision():
    served = {"score": 0.6, "lung_dice": 0.8, "infection_dice": 0.4}
    assert promotion_decision({"score": 0.5}, None, ["score"])[0] == "promoted"
    assert promotion_decision({"score": 0.5}, None, ["score"])[1] == "no served model"
    assert promotion_decision({"score": 0.6}, served, ["score"])[0] == "promoted"  # equal is not worse
    assert promotion_decision({"score": 0.59999}, served, ["score"])[0] == "kept"
    assert promotion_decision({"score": 0.59}, served, ["score"], tolerance=0.01)[0] == "promoted"
    assert promotion_decision({"score": 0.58}, served, ["score"], tolerance=0.01)[0] == "kept"
    decision, reason = promotion_decision({"score": 0.7, "lung_dice": 0.7, "infection_dice": 0.5}, served,
                                          ["score", "lung_dice"], force=True)
    assert decision == "forced" and "lung_dice (0.7 < 0.8 - 0.0)" in reason and "score (" not in reason
    assert promotion_decision({"score": 0.7, "lung_dice": 0.7}, served, ["score"], force=True)[0] == "promoted"
    # a metric these slices cannot measure (no served value) is not compared; none at all -> the score
    decision, reason = promotion_decision({"score": 0.7}, served, ["cls_auc", "lung_dice"])
    assert decision == "kept" and "cls_auc not measurable" in reason
    decision, reason = promotion_decision({"score": 0.7}, served, ["cls_auc"])
    assert decision == "promoted" and "score 0.7 vs 0.6" in reason and "cls_auc not measurable" in reason
    assert promotion_decision({"score": 0.7}, served, ["infection_dice"])[0] == "kept"  # the new one lacks it


def test_a_retrain_is_made_current_only_when_not_worse(tmp_path):
    """Real one-process runs of the trainer on phantoms with a ModelStore in a temp folder. The served
    model is a tiny network trained for a few epochs (it marks about every pixel as lung: lung Dice ~0.2);
    fine-tuning it with a learning rate of 10 wrecks it (no lung at all): kept, not current; then forced
    current; a fresh network trained with a sane learning rate is promoted over that wreck."""
    from lib.datastore import HybridCTDatastore
    from lib.trainers.hybrid_ct import HybridCTTrain
    from server_fixture import PHANTOM_SHAPE, TINY_NET, train_tiny_model

    from hybrid_ct.data.phantom import write_phantom_set

    write_phantom_set(tmp_path / "studies", n=5, seed=3, shape=PHANTOM_SHAPE)  # phantom_003 is validation
    store = ModelStore(tmp_path / "model")
    train_tiny_model(store.shipped)
    task = HybridCTTrain(store, net_config=TINY_NET)
    datalist = task.pre_process({}, HybridCTDatastore(str(tmp_path / "studies"), auto_reload=False))

    def retrain(**params):
        req = dict(task.config(), max_epochs=1, train_batch_size=8, augment=False, multi_gpu=False, device="cpu",
                   run_id="promote-test", model="hybrid_ct")
        stats = task.train(0, 1, dict(req, **params), datalist)
        assert stats == {k: v for k, v in store.read_stats().items() if k != "history"}
        promotion = stats["promotion"]
        assert store.entry(stats["published_version"])["promotion"] == promotion
        assert stats["current_version"] == store.current()
        if promotion["val_on_training_set"]:  # no held-out image, no replay: not scored, judged later
            assert promotion["decision"] == "pending" and promotion["new"] is None
        else:  # the gate scores held-out slices; the epoch was picked on the training slices
            assert promotion["val_slices"] == stats["val"]["slices"] and promotion["val_replay_slices"] == 0
        return stats, promotion

    wrecked = dict(learning_rate=10.0)
    stats, promotion = retrain(**wrecked)
    assert promotion["decision"] == "kept", promotion
    assert promotion["new"]["score"] < promotion["served"]["score"]
    assert (promotion["served_version"], promotion["metrics"], promotion["tolerance"]) == (SHIPPED, ["score"], 0.0)
    assert (promotion["val_images"], promotion["val_on_training_set"]) == (1, False)
    assert stats["published_version"] == "v0001" and store.current() == SHIPPED == stats["current_version"]
    assert set(promotion["new"]) == set(promotion["served"]) <= set(PROMOTE_METRICS)

    stats, promotion = retrain(**wrecked, force_promote=True)
    assert promotion["decision"] == "forced" and promotion["new"]["score"] < promotion["served"]["score"]
    assert "force_promote" in promotion["reason"] and promotion["force_promote"] is True
    assert store.current() == "v0002" == stats["published_version"]

    stats, promotion = retrain(pretrained=False, max_epochs=2, learning_rate=3e-3)
    assert promotion["decision"] == "promoted" and promotion["served_version"] == "v0002"
    assert promotion["new"]["score"] >= promotion["served"]["score"]
    assert store.current() == "v0003" == stats["current_version"]

    # nothing held out (no validation image, no replay): never judged on the slices it has just fitted; it is
    # published pending and judged at the next run's start on the correction that arrived since
    params = dict(val_split=0.0, promote_metrics="lung_dice,infection_dice", promote_tolerance=0.05)
    stats, promotion = retrain(**params)
    assert promotion["decision"] == "pending" and promotion["val_on_training_set"], promotion
    assert promotion["new"] is None and promotion["val_slices"] == 0 and "next correction" in promotion["reason"]
    assert store.current() == "v0003" == stats["current_version"] and stats["published_version"] == "v0004"
    assert "judged" not in stats and store.meta("v0004")["trained_ids"] == [c["id"] for c in datalist]

    # no correction neither model has seen: it stays pending (and the run's own result too)
    stats, promotion = retrain(**params)
    assert stats["judged"]["candidate"] == "v0004" and stats["judged"]["decision"] == "pending"
    assert store.current() == "v0003" and promotion["decision"] == "pending"  # v0005

    # a new correction: the pending v0005 and the served v0003 are both scored on it, before training on it
    write_phantom_set(tmp_path / "more", n=1, seed=11, shape=PHANTOM_SHAPE)
    for src, dst in ((tmp_path / "more" / "phantom_000.nii.gz", tmp_path / "studies" / "new_000.nii.gz"),
                     (tmp_path / "more" / "labels" / "final" / "phantom_000.nii.gz",
                      tmp_path / "studies" / "labels" / "final" / "new_000.nii.gz")):
        shutil.copy(src, dst)
    datalist = task.pre_process({}, HybridCTDatastore(str(tmp_path / "studies"), auto_reload=False))
    stats, promotion = retrain(**params)
    judged = stats["judged"]
    assert (judged["candidate"], judged["served_version"], judged["judged_on"]) == ("v0005", "v0003", ["new_000"])
    not_worse = all(judged["new"][m] >= judged["served"][m] - 0.05 for m in ("lung_dice", "infection_dice"))
    assert judged["decision"] == ("promoted" if not_worse else "kept"), judged
    assert store.entry("v0005")["promotion"]["decision"] == judged["decision"]  # the sidecar records it
    assert store.entry("v0005")["promotion"]["published_as"] == "pending"
    assert promotion["served_version"] == ("v0005" if not_worse else "v0003") == store.current()
    assert promotion["decision"] == "pending" and stats["published_version"] == "v0006"
    assert [v["version"] for v in store.versions()] == [SHIPPED] + [f"v000{i}" for i in range(1, 7)]

    # from_shipped: the run fine-tunes the shipped model on every correction, and is still judged against the
    # model served now (here on a validation image: gated at once)
    served = store.current()
    stats, promotion = retrain(from_shipped=True)
    assert stats["parent_version"] == SHIPPED and promotion["served_version"] == served != SHIPPED
    assert promotion["decision"] in ("promoted", "kept") and promotion["val_images"] >= 1


@pytest.mark.slow
def test_multi_process_training_with_gloo_publishes_one_version(tmp_path):
    """The DDP path of the trainer (what MONAI Label spawns per GPU), here 2 CPU processes with gloo."""
    from lib.datastore import HybridCTDatastore
    from lib.trainers.hybrid_ct import HybridCTTrain
    from monailabel.tasks.train.basic_train import main_worker

    from hybrid_ct.data.phantom import write_phantom_set

    studies = tmp_path / "studies"
    write_phantom_set(studies, n=4, seed=3, shape=(4, 32, 32))
    ds = HybridCTDatastore(str(studies), auto_reload=False)
    store = ModelStore(tmp_path / "model")
    task = HybridCTTrain(store, net_config=dict(TINY, in_size=32))
    req = dict(task.config(), max_epochs=2, train_batch_size=2, val_batch_size=4, pretrained=False, augment=False,
               multi_gpu=True, distributed_backend="gloo", distributed_url=f"file://{tmp_path / 'ddp_init'}",
               device="cpu", run_id="ddp-test", model="hybrid_ct")
    datalist = task.pre_process(req, ds)
    assert len(datalist) == 4 and all("label_info" in d for d in datalist)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.multiprocessing.spawn(main_worker, nprocs=2, args=(2, req, datalist, task), join=True)
    stats = store.read_stats()
    assert stats["status"] == "DONE" and stats["world_size"] == 2 and stats["epoch"] == 2
    assert store.current() == stats["published_version"] == "v0001"
    assert [v["version"] for v in store.versions()] == ["v0001"]
    assert 0.0 <= stats["best_metric"] <= 1.0


def test_dicom_series_folders_in_the_studies_are_imported_once(tmp_path):
    from lib.datastore import HybridCTDatastore
    from server_fixture import write_dicom_series

    from hybrid_ct.data.phantom import make_phantom

    studies = tmp_path / "studies"
    img, lab, _ = make_phantom(3, shape=(6, 48, 48), positive=True)
    write_dicom_series(img, studies / "chest_series")
    arr = sitk.GetArrayFromImage(img)
    arr[sitk.GetArrayFromImage(lab) > 0] = 40  # lungs filled: not a chest
    no_air = sitk.GetImageFromArray(arr)
    no_air.CopyInformation(img)
    write_dicom_series(no_air, studies / "not_chest")
    ds = HybridCTDatastore(str(studies), auto_reload=False)
    assert ds.list_images() == ["chest_series"]
    stored = sitk.ReadImage(str(studies / "chest_series.nii.gz"))
    assert stored.GetSize() == img.GetSize() and np.allclose(stored.GetOrigin(), img.GetOrigin(), atol=1e-3)
    skipped = (studies / ".dicom_import_skipped.json").read_text()
    assert "not_chest" in skipped and "not a chest" in skipped
    HybridCTDatastore(str(studies), auto_reload=False)  # a second start converts nothing again
    assert sorted(p.name for p in studies.iterdir() if p.suffix == ".gz") == ["chest_series.nii.gz"]
