"""The MONAI Label app against the REAL server over HTTP, the way 3D Slicer talks to it:
/info, whole-volume inference (NIfTI / NRRD out, DICOM series in), submitting a corrected label by
segment names, active-learning strategies and the uncertainty scoring, "no trained model yet"."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
from hybrid_ct.contract import FOREGROUND, LABELS, PREDICTED, SIDES
from hybrid_ct.processing.sides import lung_sides
from server_fixture import (UNLABELLED, http, parse_infer, phantom_files, read_image_bytes, server,  # noqa: F401
                            wait_training_idle, wait_until, write_dicom_series)

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPORT_KEYS = {"classification", "burden", "grade", "energy", "latency_s", "model_version", "label_names"}


def _infer(live, image_id, params=None, output="all"):
    return http().post(f"{live.url}/infer/hybrid_ct", params={"image": image_id, "output": output},
                       files={"params": (None, json.dumps(params or {}))}, timeout=600)


def _current_version(live):
    return http().get(f"{live.url}/hybrid_ct/versions", timeout=30).json()["current"]


def test_info_lists_the_model_with_its_labels(server):
    info = http().get(f"{server.url}/info/", timeout=30).json()
    assert info["name"] == "Hybrid CT"
    model = info["models"]["hybrid_ct"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == PREDICTED == {"right_lung": 3, "left_lung": 4, "infection": 2}
    assert sorted(info["labels"]) == sorted(PREDICTED)  # MONAI Label lists them by value
    assert set(info["models"]) == {"hybrid_ct"}, "only our own model: no SAM2 / zoo models registered"
    assert "hybrid_ct" in info["trainers"]
    assert {"random", "first", "uncertainty"} <= set(info["strategies"])
    assert "uncertainty" in info["scoring"]
    assert info["hybrid_ct"]["ready"] is True
    assert info["datastore"]["total"] >= 6


def test_infer_returns_label_map_in_image_geometry_and_the_report(server):
    image_id = UNLABELLED[0]
    ref = sitk.ReadImage(str(server.studies / f"{image_id}.nii.gz"))
    resp = _infer(server, image_id, {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert resp.status_code == 200, resp.text
    params, data, name = parse_infer(resp)
    assert name.endswith(".nrrd") and data
    label = read_image_bytes(data, name)
    assert label.GetSize() == ref.GetSize()
    assert np.allclose(label.GetSpacing(), ref.GetSpacing()) and np.allclose(label.GetOrigin(), ref.GetOrigin())
    assert np.allclose(label.GetDirection(), ref.GetDirection())
    assert label.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(label)).tolist()) <= {0, 2, 3, 4}

    assert REPORT_KEYS <= set(params), params
    assert params["label_names"] == PREDICTED
    cls = params["classification"]
    assert cls["label"] in ("positive", "negative", "indeterminate") and 0.0 <= cls["probability"] <= 1.0
    assert set(params["burden"]) >= {"total_pct", "left_pct", "right_pct"}
    assert all(0.0 <= params["burden"][k] <= 100.0 for k in ("total_pct", "left_pct", "right_pct"))
    assert params["grade"] in {f"CT-{i}" for i in range(5)}
    e = params["energy"]
    assert e["e_hybrid_uj"] > 0 and e["e_conv_uj"] > 0 and e["ratio"] == pytest.approx(e["e_hybrid_uj"] / e["e_conv_uj"])
    assert 0.0 <= e["mean_firing_rate"] <= 1.0
    assert params["latency_s"] > 0
    assert params["model_version"] == _current_version(server)

    # the default output format is NIfTI; output=json gives the report alone
    params2, data2, name2 = parse_infer(_infer(server, image_id))
    assert name2.endswith(".nii.gz") and read_image_bytes(data2, name2).GetSize() == ref.GetSize()
    only = _infer(server, image_id, output="json")
    assert only.status_code == 200 and REPORT_KEYS <= set(only.json())
    bad = _infer(server, image_id, {"result_extension": ".exe"})
    assert bad.status_code == 422 and "result_extension" in bad.json()["detail"]

    # a volume sent with the request itself (not stored in the datastore)
    before = http().get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()["total"]
    sent = http().post(f"{server.url}/infer/hybrid_ct", params={"output": "all"},
                       files={"file": ("volume.nii.gz", (server.studies / f"{image_id}.nii.gz").read_bytes()),
                              "params": (None, "{}")}, timeout=600)
    assert sent.status_code == 200, sent.text
    assert read_image_bytes(*parse_infer(sent)[1:]).GetSize() == ref.GetSize()
    assert http().get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()["total"] == before


def test_dicom_series_upload_is_stored_as_nifti_and_inferred(server, tmp_path):
    _, _, img, _ = phantom_files(tmp_path / "src", seed=21)
    series = write_dicom_series(img, tmp_path / "series")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(series.iterdir()):
            z.write(p, arcname=f"study/series/{p.name}")
    r = http().put(f"{server.url}/datastore/", params={"image": "dicom case"},
                   files={"file": ("series.zip", buf.getvalue()), "params": (None, "{}")}, timeout=120)
    assert r.status_code == 200, r.text
    assert (server.studies / "dicom case.nii.gz").is_file()
    resp = _infer(server, "dicom case")
    assert resp.status_code == 200, resp.text
    params, data, name = parse_infer(resp)
    label = read_image_bytes(data, name)
    assert label.GetSize() == img.GetSize()
    assert np.allclose(label.GetOrigin(), img.GetOrigin(), atol=1e-3)
    assert np.allclose(label.GetSpacing(), img.GetSpacing(), atol=1e-4)


def test_submit_corrected_label_is_stored_by_segment_name(server, tmp_path):
    s = http()
    ip, lp, img, lab = phantom_files(tmp_path, seed=31, positive=True, name="corrected")
    r = s.put(f"{server.url}/datastore/", params={"image": "corrected case"},
              files={"file": (ip.name, ip.read_bytes()), "params": (None, json.dumps({"diagnosis": "positive"}))},
              timeout=120)
    assert r.status_code == 200, r.text
    before = s.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert _infer(server, "corrected case").status_code == 200

    # the radiologist's segments in another order and with other values: infection 1, lung 7
    truth = sitk.GetArrayFromImage(lab)
    sent = np.zeros_like(truth)
    sent[truth == 1] = 7
    sent[truth == 2] = 1
    sent_img = sitk.GetImageFromArray(sent.astype(np.uint8))
    sent_img.CopyInformation(lab)
    path = tmp_path / "sent.nrrd"
    sitk.WriteImage(sent_img, str(path))
    label_info = [{"name": "Infection", "idx": 1}, {"name": "Lungs", "idx": 7}, {"name": "Ruler", "idx": 9}]
    r = s.put(f"{server.url}/datastore/label", params={"image": "corrected case", "tag": "final"},
              files={"label": ("label.nrrd", path.read_bytes()),
                     "params": (None, json.dumps({"label_info": label_info}))}, timeout=120)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["label_info"] == [{"name": n, "idx": v} for n, v in FOREGROUND.items()]
    assert any("Ruler" in w for w in res["warnings"])

    got = s.get(f"{server.url}/datastore/label", params={"label": "corrected case", "tag": "final"}, timeout=60)
    assert got.status_code == 200
    name = got.headers["content-disposition"].split("filename=")[-1].strip('"')
    stored = read_image_bytes(got.content, name)
    assert np.array_equal(sitk.GetArrayFromImage(stored), truth), "the label was not remapped by segment names"
    assert np.allclose(stored.GetOrigin(), img.GetOrigin()) and np.allclose(stored.GetSpacing(), img.GetSpacing())
    after = s.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert after["completed"] == before["completed"] + 1
    info = s.get(f"{server.url}/datastore/label/info", params={"label": "corrected case", "tag": "final"},
                 timeout=30).json()
    assert info["submitted_label_info"] == label_info

    # a correction with the sides, as the Slicer module sends it now, other values and synonyms: stored by name
    sided = lung_sides(truth, lab)
    sent = np.zeros_like(sided)
    sent[sided == SIDES["right"]], sent[sided == SIDES["left"]], sent[sided == LABELS["infection"]] = 5, 6, 1
    sent_img = sitk.GetImageFromArray(sent.astype(np.uint8))
    sent_img.CopyInformation(lab)
    sitk.WriteImage(sent_img, str(path))
    label_info = [{"name": "GGO", "idx": 1}, {"name": "Right lung", "idx": 5}, {"name": "lung_left", "idx": 6}]
    r = s.put(f"{server.url}/datastore/label", params={"image": "corrected case", "tag": "sided"},
              files={"label": ("label.nrrd", path.read_bytes()),
                     "params": (None, json.dumps({"label_info": label_info}))}, timeout=120)
    assert r.status_code == 200, r.text
    got = s.get(f"{server.url}/datastore/label", params={"label": "corrected case", "tag": "sided"}, timeout=60)
    stored = read_image_bytes(got.content, got.headers["content-disposition"].split("filename=")[-1].strip('"'))
    assert np.array_equal(sitk.GetArrayFromImage(stored), sided) and {3, 4} <= set(np.unique(sided).tolist())


def _unlabelled(live):
    ds = http().get(f"{live.url}/datastore/", params={"output": "all"}, timeout=30).json()
    return sorted(k for k, v in ds["objects"].items() if not v["labels"].get("final"))


def test_next_sample_follows_the_chosen_strategy(server):
    s = http()
    unlabelled = _unlabelled(server)
    assert len(unlabelled) >= 2

    first = s.post(f"{server.url}/activelearning/first", json={}, timeout=60).json()
    assert first["id"] == unlabelled[0]
    rnd = s.post(f"{server.url}/activelearning/random", json={}, timeout=60).json()
    assert rnd["id"] in unlabelled

    # uncertainty scoring (MONAI Label's async scoring task) records a score for every unlabelled image
    r = s.post(f"{server.url}/scoring/uncertainty", timeout=60)
    assert r.status_code == 200, r.text
    task_id = r.json()["id"]

    def scoring_done():
        t = s.get(f"{server.url}/scoring/", timeout=30).json()
        return t if t["id"] == task_id and t["status"] in ("DONE", "ERROR") else None

    task = wait_until(scoring_done, "the uncertainty scoring task to finish")
    assert task["status"] == "DONE", task.get("details")
    version = _current_version(server)
    scores = {}
    for image_id in unlabelled:
        info = s.get(f"{server.url}/datastore/image/info", params={"image": image_id}, timeout=30).json()
        u = info.get("uncertainty")
        assert u and u["model_version"] == version, f"{image_id}: {info}"
        assert 0.0 <= u["score"] <= 1.0 and 0.0 <= u["seg_entropy"] <= 1.0 and 0.0 <= u["firing_variance"] <= 1.0
        scores[image_id] = u["score"]

    # the strategy serves the highest score: make the ranking unambiguous, then ask
    target = unlabelled[-1]
    for i, image_id in enumerate(unlabelled):
        u = {"score": 0.9 if image_id == target else 0.1 + 0.01 * i, "model_version": version}
        r = s.put(f"{server.url}/datastore/image/info", params={"image": image_id},
                  files={"info": (None, json.dumps({"uncertainty": u}))}, timeout=30)
        assert r.status_code == 200, r.text
    pick = s.post(f"{server.url}/activelearning/uncertainty", json={}, timeout=60).json()
    assert pick["id"] == target and pick["uncertainty"]["score"] == 0.9
    # the image just served is reserved for a while: the next request gets the next most uncertain one
    again = s.post(f"{server.url}/activelearning/uncertainty", json={}, timeout=60).json()
    assert again["id"] != target and again["id"] in unlabelled

    assert s.post(f"{server.url}/activelearning/nope", json={}, timeout=30).status_code == 404


def test_without_a_trained_model_inference_answers_clearly(server):
    """Move the model folder away (atomic rename): no untrained weights are ever used."""
    wait_training_idle(server)
    moved = server.model_dir.with_name("model.away")
    server.model_dir.rename(moved)
    try:
        server.model_dir.mkdir()
        r = _infer(server, UNLABELLED[0])
        assert r.status_code == 503
        assert "no trained model yet" in r.json()["detail"]
        versions = http().get(f"{server.url}/hybrid_ct/versions", timeout=30).json()
        assert versions == {"current": None, "versions": [], "skipped": []}
        info = http().get(f"{server.url}/info/", timeout=30).json()
        assert info["hybrid_ct"]["ready"] is False and "hybrid_ct" in info["models"]
    finally:
        server.model_dir.rmdir()
        moved.rename(server.model_dir)
    assert _infer(server, UNLABELLED[0]).status_code == 200
