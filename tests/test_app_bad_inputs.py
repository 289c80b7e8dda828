"""Bad input over HTTP: every refusal is a clear 4xx and leaves the studies folder byte-for-byte
unchanged (sha256 of every file before and after)."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from server_fixture import (LABELLED, UNLABELLED, http, phantom_files, server, studies_digest,  # noqa: F401
                            wait_training_idle)

pytestmark = [pytest.mark.server, pytest.mark.slow]

ABDOMEN_SERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom_misc" / "abdomen_series_not_chest"


@pytest.fixture()
def unchanged(server):
    """Asserts, after the test, that the datastore files did not change at all."""
    wait_training_idle(server)  # nothing else may be writing meanwhile
    before = studies_digest(server.studies)
    yield
    after = studies_digest(server.studies)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the datastore changed: {changed}"


def _put_image(live, image_id, name, data, params="{}"):
    q = {} if image_id is None else {"image": image_id}
    return http().put(f"{live.url}/datastore/", params=q, files={"file": (name, data), "params": (None, params)},
                      timeout=120)


def _put_label(live, image_id, name, data, params=None, tag="final"):
    return http().put(f"{live.url}/datastore/label", params={"image": image_id, "tag": tag},
                      files={"label": (name, data), "params": (None, json.dumps(params or {}))}, timeout=120)


def _nifti_bytes(arr, ref=None, tmp: Path = None, name="x.nii.gz") -> bytes:
    img = sitk.GetImageFromArray(arr)
    if ref is not None:
        img.CopyInformation(ref)
    p = tmp / name
    sitk.WriteImage(img, str(p))
    return p.read_bytes()


def _expect(resp, status, *words):
    assert resp.status_code == status, f"{resp.status_code} {resp.text}"
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail
    for w in words:
        assert w.lower() in detail.lower(), detail
    return detail


def test_corrupt_and_non_ct_uploads_are_refused(server, tmp_path, unchanged):
    _expect(_put_image(server, "garbage", "garbage.nii.gz", np.random.default_rng(0).bytes(4000)), 422, "cannot read")
    _expect(_put_image(server, "empty", "empty.nii.gz", b""), 422, "empty")
    _expect(_put_image(server, "script", "evil.sh", b"#!/bin/sh\nrm -rf /\n"), 422, "unsupported file type")
    _, _, img, lab = phantom_files(tmp_path, seed=5)
    # the same body with the lungs filled with soft tissue: not a chest (an abdomen-like volume)
    arr = sitk.GetArrayFromImage(img)
    body = arr.astype(np.int16)
    body[sitk.GetArrayFromImage(lab) > 0] = 40
    _expect(_put_image(server, "abdomen", "abdomen.nii.gz", _nifti_bytes(body, img, tmp_path)), 422, "not a chest")
    # an 8-bit picture is not in Hounsfield units
    pic = (np.random.default_rng(1).random((8, 64, 64)) * 255).astype(np.uint8)
    _expect(_put_image(server, "picture", "picture.nii.gz", _nifti_bytes(pic, None, tmp_path, "p.nii.gz")), 422,
            "hounsfield")
    nan = np.full((4, 32, 32), np.nan, np.float32)
    _expect(_put_image(server, "nan", "nan.nii.gz", _nifti_bytes(nan, None, tmp_path, "n.nii.gz")), 422, "nan")
    _expect(_put_image(server, "badzip", "series.zip", b"PK\x03\x04 not really a zip"), 422, "zip")
    _expect(_put_image(server, "ok", "x.nii.gz", _nifti_bytes(arr.astype(np.int16), img, tmp_path, "ok.nii.gz"),
                       params="{not json"), 400, "json")
    _expect(_put_image(server, "ok", "x.nii.gz", _nifti_bytes(arr.astype(np.int16), img, tmp_path, "ok.nii.gz"),
                       params=json.dumps({"diagnosis": "maybe"})), 400, "diagnosis")
    # an existing id with other content is a conflict, not an overwrite
    _expect(_put_image(server, LABELLED[0], "x.nii.gz", _nifti_bytes(arr.astype(np.int16), img, tmp_path, "o.nii.gz")),
            409, "already exists")


def test_real_abdominal_dicom_series_is_refused(server, unchanged):
    if not ABDOMEN_SERIES.is_dir():
        pytest.skip(f"real data not found at {ABDOMEN_SERIES}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(ABDOMEN_SERIES.iterdir()):
            z.write(p, arcname=p.name)
    _expect(_put_image(server, "abdomen series", "abdomen.zip", buf.getvalue()), 422, "not a chest")


@pytest.mark.parametrize("bad_id", ["../evil", "../../etc/passwd", "/tmp/abs", "a/b", "..", ".hidden", "x\\y"])
def test_ids_that_try_to_escape_are_refused(server, tmp_path, bad_id, unchanged):
    ip, lp, _, _ = phantom_files(tmp_path, seed=9)
    s = http()
    _expect(_put_image(server, bad_id, "x.nii.gz", ip.read_bytes()), 400, "refused")
    _expect(_put_label(server, bad_id, "l.nii.gz", lp.read_bytes()), 400, "refused")
    _expect(s.post(f"{server.url}/infer/hybrid_ct", params={"image": bad_id}, files={"params": (None, "{}")},
                   timeout=60), 400, "refused")
    assert s.head(f"{server.url}/datastore/image", params={"image": bad_id}, timeout=30).status_code == 400
    _expect(s.get(f"{server.url}/datastore/image", params={"image": bad_id}, timeout=30), 400, "refused")
    _expect(s.get(f"{server.url}/datastore/label", params={"label": bad_id, "tag": "final"}, timeout=30), 400)
    _expect(s.delete(f"{server.url}/datastore/", params={"id": bad_id}, timeout=30), 400)
    # an upload whose FILE NAME carries the path (no id given)
    _expect(_put_image(server, None, f"{bad_id}.nii.gz", ip.read_bytes()), 400, "refused")


def test_bad_labels_are_refused(server, tmp_path, unchanged):
    image_id = UNLABELLED[0]
    ref = sitk.ReadImage(str(server.studies / f"{image_id}.nii.gz"))
    shape = sitk.GetArrayFromImage(ref).shape
    good = np.zeros(shape, np.uint8)
    good[:, 20:40, 10:30] = 1
    good[:, 25:30, 15:20] = 2
    _expect(_put_label(server, image_id, "l.nii.gz", _nifti_bytes(good[:, :32], None, tmp_path)), 422, "shape")
    _expect(_put_label(server, image_id, "l.nii.gz", _nifti_bytes(good[:-1], None, tmp_path)), 422, "shape")
    odd = good.copy()
    odd[0, 0, 0] = 5
    _expect(_put_label(server, image_id, "l.nii.gz", _nifti_bytes(odd, ref, tmp_path)), 422, "unknown values", "5")
    _expect(_put_label(server, image_id, "l.nii.gz", _nifti_bytes(good, ref, tmp_path),
                       {"label_info": [{"name": "lung", "idx": 1}, {"name": "heart", "idx": 2}]}), 422, "heart")
    _expect(_put_label(server, image_id, "l.nii.gz", _nifti_bytes(good, ref, tmp_path),
                       {"label_info": [{"name": "lung", "idx": 1}]}), 422, "does not name")
    _expect(_put_label(server, image_id, "l.nii.gz", _nifti_bytes(good, ref, tmp_path),
                       {"label_info": [{"name": "lung", "idx": 1}, {"name": "infection", "idx": 1}]}), 400)
    _expect(_put_label(server, image_id, "l.nii.gz", _nifti_bytes(good.astype(np.float32) + 0.5, ref, tmp_path)),
            422, "non-integer")
    shifted = sitk.GetImageFromArray(good)
    shifted.CopyInformation(ref)
    shifted.SetOrigin(tuple(o + 50.0 for o in ref.GetOrigin()))
    p = tmp_path / "shifted.nii.gz"
    sitk.WriteImage(shifted, str(p))
    _expect(_put_label(server, image_id, "l.nii.gz", p.read_bytes()), 422, "grid")
    _expect(_put_label(server, image_id, "l.nii.gz", b"\x00" * 300), 422, "cannot read", "l.nii.gz")
    _expect(_put_label(server, image_id, "l.txt", b"0 1 2"), 422, "unsupported")
    _expect(_put_label(server, image_id, "l.nii.gz", _nifti_bytes(good, ref, tmp_path), tag="../../x"), 400, "tag")
    _expect(_put_label(server, "no such image", "l.nii.gz", _nifti_bytes(good, ref, tmp_path)), 404, "not in the")


def test_bad_requests_to_infer_train_and_versions(server, unchanged):
    s = http()
    _expect(s.post(f"{server.url}/infer/hybrid_ct", params={"image": "no such image"},
                   files={"params": (None, "{}")}, timeout=60), 404, "not in the datastore")
    _expect(s.post(f"{server.url}/infer/other_model", params={"image": UNLABELLED[0]},
                   files={"params": (None, "{}")}, timeout=60), 404, "no model")
    _expect(s.post(f"{server.url}/infer/hybrid_ct", params={"image": UNLABELLED[0]},
                   files={"params": (None, "[1, 2]")}, timeout=60), 400, "json object")
    for params in ({"max_epochs": 0}, {"max_epochs": "many"}, {"learning_rate": -1}, {"pretrained": "perhaps"}):
        _expect(s.post(f"{server.url}/train/hybrid_ct", json=params, timeout=60), 400, "train parameter")
    _expect(s.post(f"{server.url}/train/other_model", json={}, timeout=60), 404, "no trainer")
    _expect(s.post(f"{server.url}/hybrid_ct/rollback", params={"version": "v0999"}, timeout=60), 404, "unknown")
    _expect(s.post(f"{server.url}/hybrid_ct/rollback", timeout=60), 400, "version")
