"""A real PACS in the loop: Orthanc (DICOMweb plugin) on 127.0.0.1, the app started with
``--studies http://127.0.0.1:PORT/dicom-web``, everything over HTTP.

Orthanc holds a synthetic CT series (always), an MR series (not CT: never listed, refused when asked
for) and the real P001 series of ../shared/data (when present). Skips with the reason when Orthanc is
not installed (``scripts/setup.sh`` installs it)."""
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from orthanc_fixture import dciodvfy, orthanc  # noqa: F401  (fixture)
from server_fixture import http, parse_infer, read_image_bytes, start_server, stop_server, write_dicom_series

from hybrid_ct.predict.dicom_seg import read_dicom_seg

MODEL = "hybrid_ct"
APP_DIR = str(Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct")
if APP_DIR not in sys.path:
    sys.path.insert(0, APP_DIR)  # the app's lib/ for the in-process datastore tests


def _copy_series(src, dst, modality: str, tag: str):
    """A copy of the series with new study / series / instance UIDs and another modality."""
    dst.mkdir(parents=True)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.Modality, ds.PatientID, ds.StudyID = modality, f"PACS-{tag}", tag
        ds.save_as(dst / f.name)
    return dst, series


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory, shared_data_or_none):  # noqa: F811
    from hybrid_ct.net.model_files import default_model_path
    from hybrid_ct.data.phantom import make_phantom

    tmp = tmp_path_factory.mktemp("pacs")
    img, lab, _ = make_phantom(3, shape=(12, 64, 64), positive=True)
    raw = write_dicom_series(img, tmp / "raw")
    ct_dir, ct_uid = _copy_series(raw, tmp / "ct", "CT", "CT1")
    mr_dir, mr_uid = _copy_series(raw, tmp / "mr", "MR", "MR1")
    orthanc.upload_folder(ct_dir)
    orthanc.upload_folder(mr_dir)
    series = {"ct": ct_uid, "mr": mr_uid}
    if shared_data_or_none is not None:
        p001 = shared_data_or_none / "volumes_covid_ct_md" / "P001"
        orthanc.upload_folder(p001)
        series["p001"] = str(pydicom.dcmread(next(p001.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    workdir = tmp / "app"
    server = start_server(workdir, model=default_model_path(), studies_writer=lambda p: p.mkdir(parents=True),
                          studies_url=orthanc.dicomweb, conf={"dicomweb_cache": str(workdir / "cache")})
    src = read_image_bytes_from_dir(ct_dir)
    lab = sitk.Cast(lab, sitk.sitkUInt8)
    lab.CopyInformation(src)
    yield {"server": server, "orthanc": orthanc, "series": series, "ct_dir": ct_dir, "label": lab, "tmp": tmp}
    stop_server(server)


@pytest.fixture(scope="module")
def shared_data_or_none():
    from conftest import SHARED_DATA

    return SHARED_DATA if (SHARED_DATA / "volumes_covid_ct_md" / "P001").is_dir() else None


def read_image_bytes_from_dir(folder):
    from hybrid_ct.imaging.reader import read_image

    return read_image(str(folder))


def _nifti_bytes(img, tmp_path, name="label.nii.gz") -> bytes:
    p = tmp_path / name
    sitk.WriteImage(img, str(p), useCompression=True)
    return p.read_bytes()


def test_info_and_datastore_list_the_pacs_ct_series(pacs):
    s, url, series = http(), pacs["server"].url, pacs["series"]
    ct = sorted(v for k, v in series.items() if k != "mr")
    info = s.get(url + "/info/", timeout=60).json()
    assert info["datastore"]["total"] == len(ct)
    objects = s.get(url + "/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert set(ct) <= set(objects) and series["mr"] not in objects  # only CT is listed
    r = s.post(url + "/activelearning/first", json={}, timeout=120)
    assert r.status_code == 200 and r.json()["id"] in ct


def test_infer_on_a_pacs_study_returns_label_and_report(pacs, tmp_path):
    s, url, uid = http(), pacs["server"].url, pacs["series"]["ct"]
    r = s.post(f"{url}/infer/{MODEL}", params={"image": uid, "output": "all"}, files={"params": (None, "{}")},
               timeout=600)
    assert r.status_code == 200, r.text
    params, data, name = parse_infer(r)
    label = read_image_bytes(data, name)
    assert label.GetSize() == pacs["label"].GetSize()
    assert np.allclose(label.GetOrigin(), pacs["label"].GetOrigin(), atol=1e-3)
    assert params["classification"]["label"] in ("positive", "negative", "indeterminate") and params["grade"].startswith("CT-")

    r = s.post(f"{url}/infer/{MODEL}", params={"image": uid, "output": "dicom_seg"},
               files={"params": (None, "{}")}, timeout=600)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom")
    seg = tmp_path / "infer_seg.dcm"
    seg.write_bytes(r.content)
    errors, warnings, lines = dciodvfy(seg)
    assert not errors and not warnings, "\n".join(lines)
    back, ds = read_dicom_seg(seg, pacs["ct_dir"])
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))


def test_not_ct_and_unknown_series_are_refused_clearly(pacs):
    s, url = http(), pacs["server"].url
    r = s.post(f"{url}/infer/{MODEL}", params={"image": pacs["series"]["mr"]}, files={"params": (None, "{}")},
               timeout=120)
    assert r.status_code == 422 and "not CT" in r.json()["detail"], r.text
    r = s.post(f"{url}/infer/{MODEL}", params={"image": "1.2.3.4.5.6.7"}, files={"params": (None, "{}")},
               timeout=120)
    assert r.status_code == 404 and "not in the PACS" in r.json()["detail"], r.text


def test_corrected_label_is_stored_in_the_pacs_as_dicom_seg(pacs, tmp_path):
    s, url, uid, o = http(), pacs["server"].url, pacs["series"]["ct"], pacs["orthanc"]
    r = s.put(f"{url}/datastore/label", params={"image": uid, "tag": "final"},
              files={"label": ("label.nii.gz", _nifti_bytes(pacs["label"], tmp_path)),
                     "params": (None, json.dumps({"label_info": [{"name": "lung", "idx": 1},
                                                                 {"name": "infection", "idx": 2}]}))},
              timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["pacs"] == {"state": "stored", "error": ""}, r.text  # the answer says the PACS took it
    info = s.get(f"{url}/datastore/label/info", params={"label": uid, "tag": "final"}, timeout=60).json()
    assert info["pacs"] == "stored", info
    # found again by a DICOMweb query, referencing the CT series
    segs = o.series_uids("SEG")
    assert info["SeriesInstanceUID"] in segs
    meta = s.get(f"{o.dicomweb}/series", params={"SeriesInstanceUID": info["SeriesInstanceUID"]}, timeout=30).json()
    study = meta[0]["0020000D"]["Value"][0]
    full = s.get(f"{o.dicomweb}/studies/{study}/series/{info['SeriesInstanceUID']}/metadata", timeout=30).json()
    ds = pydicom.Dataset.from_json(full[0])
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    ct_sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in pacs["ct_dir"].iterdir()}
    refs = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs and refs <= ct_sops
    assert {int(x.SegmentNumber) for x in ds.SegmentSequence} == {1, 2}
    assert all(x.SegmentAlgorithmType == "SEMIAUTOMATIC" for x in ds.SegmentSequence)
    # the file as Orthanc stores it passes dciodvfy and reads back to the submitted label
    inst = s.get(f"{o.url}/series", timeout=30).json()
    seg_file = tmp_path / "stored_seg.dcm"
    for oid in inst:
        one = s.get(f"{o.url}/series/{oid}", timeout=30).json()
        if one["MainDicomTags"].get("SeriesInstanceUID") == info["SeriesInstanceUID"]:
            seg_file.write_bytes(s.get(f"{o.url}/instances/{one['Instances'][0]}/file", timeout=60).content)
    errors, warnings, lines = dciodvfy(seg_file)
    assert not errors and not warnings, "\n".join(lines)
    back, _ = read_dicom_seg(seg_file, pacs["ct_dir"])
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(pacs["label"]))
    # the next-sample list no longer offers it as unlabelled; training's datalist holds it
    st = s.get(url + "/info/", timeout=60).json()["datastore"]
    assert st["completed"] >= 1 and st["pacs"]["pending"] == []
    train = s.get(url + "/datastore/", params={"output": "train"}, timeout=120).json()
    assert any(uid in d["image"] for d in train)


def test_training_reads_the_labels_back_from_the_pacs(pacs, tmp_path):
    """A fresh cache (another app, or the same after losing its cache) gets the label from the PACS."""
    from lib.dicomweb import dicomweb_datastore

    uid = pacs["series"]["ct"]
    ds = dicomweb_datastore(pacs["orthanc"].dicomweb, {"dicomweb_cache": str(tmp_path / "cache")})
    assert uid in ds.get_labeled_images()
    labels = {d["id"]: d for d in ds.final_labels()}
    assert uid in labels and labels[uid]["label_info"]["source"] == "pacs"
    assert "label_info" not in labels[uid]["label_info"]  # not counted as a new label for auto-retraining
    got = sitk.ReadImage(labels[uid]["label"])
    assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(pacs["label"]))
    assert any(d["label"] == labels[uid]["label"] for d in ds.datalist())


def test_unreachable_or_refusing_pacs_keeps_the_label_pending(pacs, tmp_path):
    from monailabel.datastore.dicom import DICOMwebClientX
    from server_fixture import free_port

    from lib.dicomweb import dicomweb_datastore

    uid, o = pacs["series"]["ct"], pacs["orthanc"]
    ds = dicomweb_datastore(o.dicomweb, {"dicomweb_cache": str(tmp_path / "cache")})
    ds.get_image_uri(uid)  # the series is in the cache
    good = ds._client
    before = set(o.series_uids("SEG"))
    label = tmp_path / "label.nii.gz"
    sitk.WriteImage(pacs["label"], str(label))
    for broken in (DICOMwebClientX(url=f"http://127.0.0.1:{free_port()}/dicom-web"),  # unreachable
                   DICOMwebClientX(url=f"{o.url}/no-such-dicom-web")):  # answers 404: refuses
        ds._client = broken
        assert ds.save_label(uid, str(label), "final", {}) == uid
        assert ds.pending() == [uid]
        info = ds.get_label_info(uid, "final")
        assert info["pacs"] == "pending" and info["pacs_error"]
        assert ds.get_label_uri(uid, "final")  # the label itself is kept locally
    assert set(o.series_uids("SEG")) == before
    ds._client = good
    assert ds.flush_pending() == {} and ds.pending() == []
    info = ds.get_label_info(uid, "final")
    assert info["pacs"] == "stored" and info["SeriesInstanceUID"] in o.series_uids("SEG")


def test_nothing_downloaded(pacs):
    assert pacs["server"].egress == []  # no dcmqi, no model zoo: the DICOM-SEG is written with pydicom-seg


def test_p001_from_the_pacs(pacs, tmp_path):
    uid = pacs["series"].get("p001")
    if not uid:
        pytest.skip("../shared/data/volumes_covid_ct_md/P001 is absent")
    s, url = http(), pacs["server"].url
    r = s.post(f"{url}/infer/{MODEL}", params={"image": uid, "output": "dicom_seg"},
               files={"params": (None, "{}")}, timeout=900)
    assert r.status_code == 200, r.text
    seg = tmp_path / "p001_seg.dcm"
    seg.write_bytes(r.content)
    errors, warnings, lines = dciodvfy(seg)
    assert not errors and not warnings, "\n".join(lines)
    _, ds = read_dicom_seg(seg)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid and ds.PatientID
