"""``hybrid-ct`` subcommands on every input kind (real files read in place from ../shared/data)."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.cli import main
from hybrid_ct.imaging.reader import write_image


@pytest.fixture(scope="module")
def phantom_nifti(tmp_path_factory):
    from hybrid_ct.data.phantom import make_phantom

    img, lab, _ = make_phantom(5, shape=(10, 56, 64), positive=True)
    p = tmp_path_factory.mktemp("in") / "chest phantom.nii.gz"
    write_image(img, p)
    return p, img


def _summary(out):
    with open(out / "summary.csv", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def _predict(model_path, out, *inputs, extra=()):
    return main(["-q", "predict", *map(str, inputs), "--model", str(model_path), "--out", str(out), *extra])


def test_predict_nifti_volume(model_path, phantom_nifti, tmp_path):
    path, img = phantom_nifti
    assert _predict(model_path, tmp_path, path) == 0
    lab = sitk.ReadImage(str(tmp_path / "chest_phantom_label.nii.gz"))
    assert lab.GetSize() == img.GetSize() and np.allclose(lab.GetSpacing(), img.GetSpacing())
    assert np.allclose(lab.GetOrigin(), img.GetOrigin()) and np.allclose(lab.GetDirection(), img.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(lab))) <= {0, 1, 2}
    rep = json.loads((tmp_path / "chest_phantom.json").read_text())
    assert rep["classification"]["label"] in ("positive", "negative", "indeterminate")
    assert {"burden", "grade", "energy", "latency_s", "model_version"} <= set(rep)
    assert rep["model_version"] == "tiny-test" and rep["kind"] == "volume"
    assert (tmp_path / "chest_phantom_overlay.png").stat().st_size > 1000
    row = _summary(tmp_path)["chest_phantom"]
    assert row["status"] == "ok" and row["grade"].startswith("CT-")


def test_predict_writes_the_one_page_report(model_path, phantom_nifti, tmp_path):
    path, _ = phantom_nifti
    assert _predict(model_path, tmp_path, path, extra=("--report", "--overlays", "0")) == 0
    pdf = tmp_path / "chest_phantom_report.pdf"
    assert pdf.read_bytes().startswith(b"%PDF") and (tmp_path / "chest_phantom_report.png").is_file()
    assert json.loads((tmp_path / "chest_phantom.json").read_text())["outputs"]["report"] == pdf.name


def test_predict_dicom_folder_and_file(model_path, shared_data, tmp_path):
    folder = shared_data / "dicom_misc" / "covid19_ny_sbu_slices" / "A002304" / "axial"
    single = shared_data / "dicom_misc" / "lidc_slice" / "0.dcm"
    assert _predict(model_path, tmp_path, folder, single) == 0
    rows = _summary(tmp_path)
    assert rows["0"]["status"] == "ok" and rows["0"]["kind"] == "dicom"
    ref = sitk.ReadImage(str(single))
    lab = sitk.ReadImage(str(tmp_path / "0_label.nii.gz"))
    assert lab.GetSize()[:2] == ref.GetSize()[:2]
    # the folder holds one slice of each of two series (two studies): each is listed, none picked silently
    series = [r for r in rows.values() if r["input"] == str(folder)]
    assert len(series) == 2 and len({r["series_uid"] for r in series}) == 2
    assert all(r["status"] == "skipped" and r["error"].startswith("too few slices: 1") for r in series)
    out = tmp_path / "one_slice_series"
    assert _predict(model_path, out, folder, extra=["--min-slices", "1", "--overlays", "0"]) == 0
    rows = _summary(out)
    assert len(rows) == 2 and all(r["status"] == "ok" and r["case"].startswith("A002304_CT_") for r in rows.values())
    assert all((out / f"{name}_label.nii.gz").is_file() and (out / f"{name}.json").is_file() for name in rows)


def test_predict_2d_picture_and_npy(model_path, shared_data, tmp_path):
    from PIL import Image

    jpg = shared_data / "seg2d_medseg" / "images" / "0.jpg"
    hu_npy = shared_data / "lung2d_majun" / "coronacases_001_image_slice_98.npy"
    u8_npy = tmp_path / "in" / "medseg_0_uint8.npy"  # an 8-bit slice saved as .npy
    u8_npy.parent.mkdir()
    np.save(u8_npy, np.asarray(Image.open(jpg)))
    assert _predict(model_path, tmp_path, jpg, hu_npy, u8_npy) == 0
    lab = np.asarray(Image.open(tmp_path / "0_label.png"))
    assert lab.shape == np.asarray(Image.open(jpg)).shape and set(np.unique(lab)) <= {0, 2, 3, 4}  # sided lungs 3, 4
    assert np.load(tmp_path / "coronacases_001_image_slice_98_label.npy").shape == (512, 512)
    assert np.load(tmp_path / "medseg_0_uint8_label.npy").shape == np.asarray(Image.open(jpg)).shape
    reps = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert reps["0"]["intensity"] == "8bit-auto" and reps["coronacases_001_image_slice_98"]["intensity"] == "hu"
    assert reps["medseg_0_uint8"]["intensity"] == "8bit-auto"
    assert (tmp_path / "0_overlay.png").is_file()


def test_predict_folder_of_slices(model_path, shared_data, tmp_path):
    src = tmp_path / "slices"
    src.mkdir()
    for k in (1, 2):
        shutil.copy(shared_data / "seg2d_medseg" / "images" / f"{k}.jpg", src / f"{k}.jpg")
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert _predict(model_path, out, src, extra=["--overlays", "0", "--no-chest-check"]) == 0
    assert set(_summary(out)) == {"1", "2"}
    assert not list(out.glob("*overlay*"))


def test_refused_inputs_are_listed_and_the_batch_goes_on(model_path, shared_data, tmp_path, capsys):
    import time

    from PIL import Image

    # MedSeg slice 2 is cropped to the lungs (refused by the old body-enclosed air rule): now a chest
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((128, 128), 90, np.uint8)).save(blank)
    coronal = next((shared_data / "dicom_misc" / "covid19_ny_sbu_slices").glob("*/coronal/*.dcm"))
    t0 = time.perf_counter()
    rc = _predict(model_path, tmp_path / "out", shared_data / "seg2d_medseg" / "images" / "2.jpg", blank, coronal,
                  extra=["--overlays", "0"])
    assert rc == 3  # some inputs refused, the others ran
    assert time.perf_counter() - t0 < 60  # the coronal slice is refused, not run as 512 one-pixel slices
    rows = _summary(tmp_path / "out")
    assert rows["2"]["status"] == "ok"
    assert rows["blank"]["status"] == "refused" and "not a chest" in rows["blank"]["error"]
    assert "--no-chest-check" in rows["blank"]["error"]
    assert rows[coronal.stem]["status"] == "refused" and "coronal slice" in rows[coronal.stem]["error"]
    assert sum(ln.startswith("error:") for ln in capsys.readouterr().err.splitlines()) == 2


def test_predict_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 every input ran; 3 some inputs were refused" in out
    assert "every DICOM series found was skipped" in out and "patient/study/series" in out
    assert "--min-slices N" in out


def test_bad_inputs_do_not_stop_the_batch(model_path, phantom_nifti, shared_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.nii.gz").write_bytes(b"")
    (bad / "text.png").write_text("not a picture")
    abdomen = shared_data / "dicom_misc" / "abdomen_nifti_not_chest" / "example_ct.nii.gz"
    out = tmp_path / "out"
    rc = _predict(model_path, out, bad / "empty.nii.gz", bad / "text.png", tmp_path / "missing.nii.gz", abdomen,
                  phantom_nifti[0])
    assert rc == 3
    rows = _summary(out)
    assert rows["chest_phantom"]["status"] == "ok"
    errors = {k: r["error"] for k, r in rows.items() if r["status"] == "refused"}
    assert len(errors) == 4
    assert "empty" in errors["empty"] and "not a chest" in errors["example_ct"]
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 4  # one line per bad case


def test_intensity_hu_on_a_picture_and_missing_model(model_path, shared_data, tmp_path, capsys):
    jpg = shared_data / "seg2d_medseg" / "images" / "3.jpg"
    assert _predict(model_path, tmp_path / "a", jpg, extra=["--intensity", "hu"]) == 3
    assert "8bit" in _summary(tmp_path / "a")["3"]["error"]
    assert _predict(tmp_path / "none.pt", tmp_path / "b", jpg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no trained model")


def test_phantoms_command(tmp_path):
    assert main(["-q", "phantoms", "--out", str(tmp_path), "-n", "2", "--shape", "6", "40", "40"]) == 0
    assert len(list(tmp_path.glob("phantom_*.nii.gz"))) == 2
    assert len(list((tmp_path / "labels" / "final").glob("*.nii.gz"))) == 2


def test_train_quick_then_evaluate(shared_data, tmp_path):
    hyb, twin, card = tmp_path / "m" / "pretrained.pt", tmp_path / "twin.pt", tmp_path / "model_card.md"
    card.write_text("# card\n\n<!-- hybrid-ct:training:start -->\nold\n<!-- hybrid-ct:training:end -->\n")
    rc = main(["-q", "train", "--recipe", "quick", "--data", str(shared_data), "--out", str(hyb), "--twin-out", str(twin),
               "--sources", "medseg,cls2d,majun", "--limit", "4", "--phantoms", "2", "--max-iters", "1",
               "--model-card", str(card)])
    assert rc == 0
    model, meta = load_checkpoint(hyb)
    assert meta["complete"] and meta["kind"] == "hybrid" and len(meta["history"]) == 1
    assert meta["val_groups"] and meta["recipe"]["name"] == "quick"
    assert hyb.stat().st_size < 20 * 2**20
    _, tmeta = load_checkpoint(twin)
    assert tmeta["kind"] == "cnn_twin" and tmeta["net"]["spiking"] is False
    conv = meta["conversion"]  # the quick recipe starts the hybrid from its twin, like the shipped one
    assert conv["bn_scale"] in (2.0, 3.0) and set(conv["val_score_by_bn_scale"]) == {"2.0", "3.0"}
    ratios = conv["energy_ratio_by_bn_scale"]
    assert set(ratios) == {"2.0", "3.0"} and all(0 < r < 1 for r in ratios.values())
    within = [k for k, r in ratios.items() if r <= conv["energy_target"]]  # the quick recipe's pick rule
    pick = (max(within, key=conv["val_score_by_bn_scale"].get) if within else min(ratios, key=ratios.get))
    assert str(conv["bn_scale"]) == pick
    assert "initialised from the trained twin" in card.read_text()
    assert main(["-q", "train", "--recipe", "quick", "--data", str(shared_data), "--out", str(hyb), "--no-twin",
                 "--sources", "medseg", "--limit", "2", "--phantoms", "1"]) != 0  # conversion needs the twin
    assert "old" not in card.read_text() and "Recipe `quick`" in card.read_text()

    out = tmp_path / "docs" / "results.md"
    rc = main(["-q", "evaluate", "--model", str(hyb), "--twin", str(twin), "--out", str(out), "--data", str(shared_data),
               "--skip-scan-check", "--model-card", str(card), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    numbers = json.loads((tmp_path / "r.json").read_text())  # what python -m hybrid_ct.evaluate.seeds reads
    assert set(numbers) == {"hybrid", "twin"} and 0 < numbers["hybrid"]["energy"]["ratio"] < 1
    text = out.read_text()
    for needle in ("## Segmentation", "## Classification", "E_hybrid / E_conv", "hybrid Dice", "twin Dice",
                   "seed 002", "Inf-Net", "0.682", "0.439", "evaluate --model",
                   "## Classification per source", "| agreeing |", "## Orientation", "| twin | 270 deg |"):
        assert needle in text, needle
    assert (out.parent / "img" / "roc.png").is_file() and (out.parent / "img" / "training_curves.png").is_file()
    assert "hybrid-ct:metrics:start" in card.read_text()


def test_oversampling_can_repeat_only_the_negatives_of_a_source():
    from hybrid_ct.train.recipes import _oversampled
    from hybrid_ct.data.slice_store import SourceSet
    from hybrid_ct.data.slice_store import SliceSet

    z = np.zeros((5, 8, 8), np.uint8)
    cls2d = SourceSet("cls2d", SliceSet(z, z.copy(), z.copy(), np.array([1, 1, 1, 0, -1], np.int8), list("abcde")))
    other = SourceSet("medseg", SliceSet(z[:2], z[:2].copy(), z[:2].copy(), np.array([1, 1], np.int8), ["f", "g"]))
    out = _oversampled([cls2d, other], {"cls2d/negative": 3, "medseg": 2}, 8)
    assert len(out) == 5 + 2 + 2 * 2
    assert (out.cls == 0).sum() == 3 and (out.cls == 1).sum() == 3 + 4
    assert out.group.count("d") == 3 and out.group.count("e") == 1


def test_group_cap_keeps_every_group_and_at_most_cap_slices_of_each():
    from hybrid_ct.train.recipes import _capped
    from hybrid_ct.data.slice_store import SourceSet
    from hybrid_ct.data.slice_store import SliceSet

    n = 30
    img = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], 4, axis=1).reshape(n, 2, 2)
    groups = ["big"] * 20 + ["small"] * 3 + ["mid"] * 7
    ss = SliceSet(img, np.zeros_like(img), np.zeros_like(img), np.ones(n, np.int8), groups)
    src = SourceSet("cls2d", ss, files=[f"f{i}.png" for i in range(n)])
    a, untouched = _capped([src, SourceSet("medseg", ss)], {"cls2d": 5}, seed=1)
    assert untouched.slices is ss
    assert {g: a.slices.group.count(g) for g in set(groups)} == {"big": 5, "small": 3, "mid": 5}
    kept = a.slices.images[:, 0, 0].tolist()  # each slice's original index, in the original order
    assert kept == sorted(kept) and a.files == [f"f{i}.png" for i in kept]
    b, _ = _capped([src, SourceSet("medseg", ss)], {"cls2d": 5}, seed=1)
    assert b.slices.images[:, 0, 0].tolist() == kept  # deterministic for a seed


def test_evaluate_reports_false_infection_on_normal_slices(model_path, tmp_path):
    from hybrid_ct.net.checkpoint import load_checkpoint
    from hybrid_ct.evaluate.validation import evaluate_sets
    from hybrid_ct.data.slice_store import SourceSet
    from hybrid_ct.evaluate.results_doc import metrics_card
    from hybrid_ct.data.slice_store import MISSING, SliceSet

    model, _ = load_checkpoint(model_path)
    rng = np.random.default_rng(0)
    n, s = 3, model.cfg.in_size
    normal = SliceSet(rng.integers(0, 255, (n, s, s), dtype=np.uint8), np.full((n, s, s), MISSING, np.uint8),
                      np.zeros((n, s, s), np.uint8), np.zeros(n, np.int8), ["mosmed_1", "mosmed_2", "ucsd_3"])
    res = evaluate_sets(model, [SourceSet("cls2d", normal)], progress=False)
    v = res["normal"]["cls2d"]
    assert v["slices"] == 3 and 0 <= v["with_infection"] <= 3 and 0 <= v["mean_infection_pct"] <= 100
    assert not any(k.startswith("infection/") for k in res["seg"])  # empty masks are not Dice targets
    assert res["cls"]["cls2d"]["n"] == 3
    # and per collection (the group-id prefix)
    assert res["cls"]["cls2d/mosmed"]["n"] == 2 and res["cls"]["cls2d/ucsd"]["n"] == 1
    card = metrics_card({"hybrid": res}, tmp_path / "results.md", tmp_path / "card.md")
    assert f"| normal slices (cls2d, CT-0) with predicted infection | {v['with_infection']} / 3 | n/a | |" in card


def test_scan_check_alignment_on_a_phantom(model_path, tmp_path, monkeypatch):
    """The per-slice calls are compared with labels by SimpleITK slice index (the P001 CSV convention)."""
    import hybrid_ct.evaluate.validation as E
    from hybrid_ct.evaluate.validation import scan_check
    from hybrid_ct.data.phantom import make_phantom

    img, lab, _ = make_phantom(7, shape=(8, 48, 48), positive=True)
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # stored superior first: index order != LPS order
    write_image(img, tmp_path / "p.nii.gz")
    inf = (sitk.GetArrayFromImage(lab) == 2).reshape(8, -1).any(1)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("nifti_z_index,infection\n" + "".join(f"{z},{int(v)}\n" for z, v in enumerate(inf)))
    monkeypatch.setattr(E, "scan_cases", lambda root=None, meta=None: {
        "P": {"path": tmp_path / "p.nii.gz", "positive": True, "infection": True, "slice_labels": csv_path,
              "lung_ref": None, "trained_on": False}})
    model, meta = load_checkpoint(model_path)
    res = scan_check(model, meta, tmp_path, progress=False, img_dir=tmp_path)
    a = res["P"]["agreement"]
    assert set(a) == {"segmentation", "classifier"}
    assert a["segmentation"]["n"] == 8 and a["segmentation"]["truth_positive"] == int(inf.sum())
    assert (tmp_path / "scan_P_hybrid.png").is_file()


def test_results_view_fills_segments_in_their_colours(tmp_path):
    from matplotlib.image import imread

    from hybrid_ct.predict.overlays import results_view

    lab = np.zeros((64, 64), np.uint8)
    lab[10:50, 8:30] = 1
    lab[20:30, 12:22] = 2
    path = results_view(np.zeros((64, 64)), lab, {1: (197, 165, 145), 2: (241, 196, 15)},
                        [("Classification", "Positive (P(positive) = 0.91)")], tmp_path / "v.png")
    px = (imread(path)[..., :3] * 255).reshape(-1, 3)
    for color in ((197, 165, 145), (241, 196, 15)):  # black CT under a 50 % fill -> half the colour
        assert (np.abs(px - np.array(color) / 2).max(1) < 3).sum() > 100, color


def test_slicer_pictures_script_renders_a_case(model_path, phantom_nifti, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "slicer_pictures", Path(__file__).resolve().parents[1] / "scripts" / "slicer_pictures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", str(model_path), "--case", str(phantom_nifti[0]), "--out", str(tmp_path)]) == 0
    pngs = list(tmp_path.glob("slicer_results_*.png"))
    params = json.loads(next(tmp_path.glob("slicer_results_*.json")).read_text())
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
    assert params["classification"]["label"] in ("positive", "negative", "indeterminate") and "energy" in params


def test_recipes_are_package_data_without_their_notes():
    from hybrid_ct.net.network import NetConfig
    from hybrid_ct.train.recipes import ENERGY_RATIO_TARGET, load_recipe, recipe_names, resolve_recipe

    assert recipe_names() == ["quick", "shipped", "shipped_2026_12_01", "shipped_2p5d", "shipped_2p5d_dropout",
                              "shipped_adaptive", "shipped_deepsup", "shipped_hardneg", "shipped_lungbox",
                              "shipped_synth", "shipped_synth_protocol", "shipped_synth_protocol_pseudo"]
    for name in recipe_names():  # every shipped recipe resolves, and its network can be built
        NetConfig(**load_recipe(name)["net"])
    assert load_recipe("shipped_2p5d")["net"]["in_channels"] == 3
    assert load_recipe("shipped_2p5d_dropout")["train"]["context_dropout"] == 0.5
    assert load_recipe("shipped_lungbox")["net"]["fov"] == "lungs"
    assert load_recipe("shipped_hardneg")["train"]["hard_negatives"] == 0.25
    assert load_recipe("shipped_synth_protocol_pseudo")["data"]["pseudo"]["families"] == ["majun20"]
    quick = load_recipe("quick")
    assert quick["train"]["from_twin"]["energy_target"] == ENERGY_RATIO_TARGET
    assert "energy_target" not in load_recipe("shipped")["train"]["from_twin"]
    assert not any(k.startswith("_") for part in quick.values() for k in part)  # "_comment" notes dropped
    r = resolve_recipe("quick", epochs=3, limit=0, sources="medseg,majun", no_weak_lung=True)
    assert r["train"]["epochs"] == 3 and r["data"]["limit"] is None and r["data"]["sources"] == ["medseg", "majun"]
    assert r["data"]["weak_lung"] is False and r["name"] == "quick" and list(r)[-1] == "name"


def test_default_model_is_the_env_then_the_package_file(model_path, shared_data, tmp_path, monkeypatch):
    import hybrid_ct.net.model_files as mf
    from hybrid_ct.errors import ModelNotReadyError

    monkeypatch.setattr(mf, "PACKAGED_MODEL", tmp_path / "none" / "pretrained.pt")
    monkeypatch.delenv(mf.MODEL_ENV, raising=False)
    with pytest.raises(ModelNotReadyError, match="HYBRID_CT_MODEL"):
        mf.default_model_path()
    monkeypatch.setenv(mf.MODEL_ENV, str(model_path))
    assert mf.default_model_path() == model_path
    jpg = shared_data / "seg2d_medseg" / "images" / "0.jpg"
    assert main(["-q", "predict", str(jpg), "--out", str(tmp_path / "o")]) == 0  # no --model: $HYBRID_CT_MODEL
    assert json.loads((tmp_path / "o" / "0.json").read_text())["model_version"] == "tiny-test"


def test_template_lines_of_empty_blocks_disappear(tmp_path, monkeypatch):
    import hybrid_ct.evaluate.results_doc as rp

    (tmp_path / "t.md").write_text("# T\n\n{a}\n\n{b}\n- one\n{c}\n- two {d}\n")
    monkeypatch.setattr(rp, "TEMPLATE_DIR", tmp_path)
    assert rp._render("t", a="", b=None, c="", d=1) == "# T\n\n- one\n- two 1"
    assert rp._render("t", a="A", b="B", c="C", d=1) == "# T\n\nA\n\nB\n- one\nC\n- two 1"


# ----------------------------------------------------------------------------------------------------
# PACS export trees: every DICOM series by SeriesInstanceUID, one case each, the rest listed as skipped

UID = "1.2.826.0.1.3680043.8.498"


def _dicom(folder, uid, img=None, n=12, seed=1, modality="CT", description="", image_type="ORIGINAL\\PRIMARY\\AXIAL",
           patient="PAT1", study="CHEST CT", number=1, prefix="", coronal=False):
    """A synthetic DICOM series (phantom slices, int16 HU) with its own UIDs and header, written into
    ``folder`` (files ``<prefix>NNNN.dcm``)."""
    import tempfile
    import zlib

    import pydicom

    from hybrid_ct.data.phantom import make_phantom
    from server_fixture import write_dicom_series

    if img is None:
        img, _, _ = make_phantom(seed, shape=(n, 64, 64), positive=True)
    if coronal:  # one coronal projection, as a scout
        img.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(write_dicom_series(img, Path(tmp) / "s").glob("*.dcm"))
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, f"{uid}.{i + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyInstanceUID = f"{UID}.9.{zlib.crc32((patient + study).encode())}"
            ds.Modality, ds.SeriesDescription, ds.ImageType = modality, description, image_type
            ds.PatientID, ds.StudyDescription, ds.SeriesNumber = patient, study, number
            if modality == "MR":
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.save_as(folder / f"{prefix}{f.name}")
    return folder


@pytest.fixture(scope="module")
def pacs_tree(tmp_path_factory):
    """patient/study/{A: CT 12 slices, B: CT 10 slices, a 1-slice localizer, an MR series}, and a folder
    mixing two CT series of another patient."""
    from hybrid_ct.data.phantom import make_phantom

    root = tmp_path_factory.mktemp("pacs")
    study = root / "tree" / "PAT1" / "STUDY1"
    _dicom(study / "SER1", f"{UID}.1.1", n=12, seed=1, description="Chest 1.25 mm", number=2)
    _dicom(study / "SER2", f"{UID}.1.2", n=10, seed=2, description="Chest 5 mm", number=3)
    scout, _, _ = make_phantom(3, shape=(1, 64, 64), positive=False)
    _dicom(study / "SER3", f"{UID}.1.3", img=scout, description="Scout", number=1,
           image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    _dicom(study / "SER4", f"{UID}.1.4", n=6, seed=4, modality="MR", description="T1 axial", number=4)
    (root / "tree" / "DICOMDIR").write_bytes(b"")  # the index of an exported CD: not a series
    (root / "tree" / "README.txt").write_text("exported by a PACS")
    mixed = root / "mixed"
    _dicom(mixed, f"{UID}.2.1", n=12, seed=5, patient="PAT/2", study="THORAX", description="Lung*", prefix="a")
    _dicom(mixed, f"{UID}.2.2", n=10, seed=6, patient="PAT/2", study="THORAX", description="Lung*", prefix="b")
    return root / "tree", mixed


def test_predict_runs_every_ct_series_of_a_pacs_tree_and_lists_what_it_skipped(model_path, pacs_tree, tmp_path):
    import re

    tree, mixed = pacs_tree
    out = tmp_path / "out"
    assert _predict(model_path, out, tree, mixed, extra=["--overlays", "0"]) == 0  # skipped series: not failures
    rows = _summary(out)
    ok = {r["series_uid"]: r for r in rows.values() if r["status"] == "ok"}
    assert set(ok) == {f"{UID}.1.1", f"{UID}.1.2", f"{UID}.2.1", f"{UID}.2.2"}
    skipped = {r["series_uid"]: r["error"] for r in rows.values() if r["status"] == "skipped"}
    assert set(skipped) == {f"{UID}.1.3", f"{UID}.1.4"} and len(rows) == 6
    assert "localizer" in skipped[f"{UID}.1.3"] and skipped[f"{UID}.1.4"] == "non-CT modality MR"
    names = [r["case"] for r in rows.values()]
    assert len(set(names)) == 6 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    assert ok[f"{UID}.1.1"]["case"] == "PAT1_CHEST_CT_Chest_1.25_mm_849811"  # patient_study_series_<UID suffix>
    assert ok[f"{UID}.2.1"]["case"].startswith("PAT_2_THORAX_Lung_")
    for uid, n in ((f"{UID}.1.1", 12), (f"{UID}.1.2", 10), (f"{UID}.2.1", 12), (f"{UID}.2.2", 10)):
        name = ok[uid]["case"]
        assert sitk.ReadImage(str(out / f"{name}_label.nii.gz")).GetSize() == (64, 64, n)
        rep = json.loads((out / f"{name}.json").read_text())
        assert rep["series_uid"] == uid and rep["files"] == n and rep["kind"] == "dicom"
    assert ok[f"{UID}.2.1"]["input"] == ok[f"{UID}.2.2"]["input"] == str(mixed)  # one folder, two cases
    # the DICOM-SEG of each series of the mixed folder references its own series (the tiny model's label is
    # empty: a lung label on the series grid stands in for it)
    import pydicom

    from hybrid_ct.predict.batch import _write_dicom_seg, expand_inputs
    from hybrid_ct.imaging.reader import read_image

    for case in expand_inputs([mixed])[0]:
        img = read_image(list(case.files))
        label = sitk.Cast(sitk.BinaryThreshold(img, -950, -500, 1, 0), sitk.sitkUInt8)
        name, note = _write_dicom_seg(case, label, {"model_version": "tiny-test"}, tmp_path)
        assert note == "" and pydicom.dcmread(tmp_path / name).ReferencedSeriesSequence[0].SeriesInstanceUID \
            == case.series_uid
    assert _predict(model_path, tmp_path / "bad", tree, extra=["--min-slices", "0"]) == 2
    # nothing but a localizer and an MR series: nothing ran, exit 3, both listed
    assert _predict(model_path, tmp_path / "none", tree / "PAT1" / "STUDY1" / "SER3",
                    tree / "PAT1" / "STUDY1" / "SER4") == 3
    assert {r["status"] for r in _summary(tmp_path / "none").values()} == {"skipped"}


def test_series_are_found_by_uid_not_by_folder(tmp_path):
    from hybrid_ct.predict.batch import expand_inputs

    root = tmp_path / "export"
    _dicom(root / "a", f"{UID}.3.1", n=12, seed=1, description="split")  # one series in two folders
    for f in sorted((root / "a").glob("*.dcm"))[6:]:
        (root / "b").mkdir(exist_ok=True)
        f.rename(root / "b" / f.name)
    shutil.copy(root / "a" / "0000.dcm", root / "b" / "copy_of_0000.dcm")  # the same instance twice
    _dicom(root / "c", f"{UID}.3.2", n=2, seed=2, description="two slices")
    (root / "d").mkdir()
    (root / "d" / "IM0001").write_bytes(b"garbage, not DICOM")
    cases, problems = expand_inputs([root])
    assert not problems
    by = {c.series_uid or c.name: c for c in cases}
    split = by[f"{UID}.3.1"]
    assert not split.skipped and len(split.files) == 12 and split.path == root
    z = [sitk.ReadImage(str(f)).GetOrigin()[2] for f in split.files]
    assert z == sorted(z)  # slice order, across the two folders
    assert "too few slices: 2" in by[f"{UID}.3.2"].skipped and "--min-slices" in by[f"{UID}.3.2"].skipped
    assert by["d_unreadable"].skipped.startswith("unreadable: 1 file(s) not readable as DICOM")
    cases, _ = expand_inputs([root], min_slices=2)
    assert not {c.series_uid: c for c in cases}[f"{UID}.3.2"].skipped


@pytest.mark.slow
def test_p001_through_the_tree_path(model_path, shared_data, tmp_path):
    """The real P001 series, linked into a patient/study/series tree beside a synthetic scout."""
    from hybrid_ct.data.phantom import make_phantom

    series = tmp_path / "tree" / "P001" / "study" / "ct"
    series.mkdir(parents=True)
    for f in (shared_data / "volumes_covid_ct_md" / "P001").glob("*.dcm"):
        (series / f.name).symlink_to(f)
    scout, _, _ = make_phantom(3, shape=(1, 64, 64), positive=False)
    _dicom(tmp_path / "tree" / "P001" / "study" / "scout", f"{UID}.4.1", img=scout, coronal=True)
    out = tmp_path / "out"
    assert _predict(model_path, out, tmp_path / "tree", extra=["--overlays", "0"]) == 0
    rows = list(_summary(out).values())
    assert sorted(r["status"] for r in rows) == ["ok", "skipped"]
    ok = next(r for r in rows if r["status"] == "ok")
    assert ok["case"].startswith("98C14734-ASSH_") and ok["series_uid"].endswith("12427")
    assert "single coronal projection" in next(r for r in rows if r["status"] == "skipped")["error"]
    lab = sitk.ReadImage(str(out / f"{ok['case']}_label.nii.gz"))
    assert lab.GetSize()[2] == len(list(series.iterdir()))
