"""``hybrid-ct download`` against a local copy served on 127.0.0.1 (tiny zips of the real layout)."""
import csv
import functools
import http.server
import threading
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

import hybrid_ct.data.download as dl
from hybrid_ct.files import file_sha256
from hybrid_ct.cli import main
from hybrid_ct.data.sources import load_prepared
from hybrid_ct.data.phantom import make_phantom


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _nifti_bytes(tmp, arr, like=None, name="x.nii.gz"):
    img = sitk.GetImageFromArray(arr)
    if like is not None:
        img.CopyInformation(like)
    p = tmp / name
    sitk.WriteImage(img, str(p))
    return p.read_bytes()


def _covid_zips(root, tmp):
    """The zenodo record's four zips, 2 cases: coronacases (HU) and radiopaedia (stored 0..255)."""
    files = {"COVID-19-CT-Seg_20cases.zip": {}, "Lung_Mask.zip": {}, "Infection_Mask.zip": {},
             "Lung_and_Infection_Mask.zip": {}}
    cases = {"coronacases_org_001.nii.gz": ("coronacases_001.nii.gz", False),
             "radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm.nii.gz": ("radiopaedia_14_85914_0.nii.gz", True)}
    for k, (img_name, (mask_name, eight_bit)) in enumerate(cases.items()):
        img, lab, _ = make_phantom(10 + k, shape=(6, 40, 40), positive=True)
        arr = sitk.GetArrayFromImage(img)
        if eight_bit:
            arr = np.clip((arr + 1350) / 1500 * 255, 0, 255).round().astype(np.float32)
        lab = sitk.GetArrayFromImage(lab)
        lungs = (lab > 0).astype(np.uint8)
        lungs[:, :, 20:] *= 2  # two lungs: 1 and 2
        files["COVID-19-CT-Seg_20cases.zip"][img_name] = _nifti_bytes(tmp, arr, img)
        files["Lung_Mask.zip"][f"Lung_Mask/{mask_name}"] = _nifti_bytes(tmp, lungs, img)
        files["Infection_Mask.zip"][mask_name] = _nifti_bytes(tmp, (lab == 2).astype(np.uint8), img)
        files["Lung_and_Infection_Mask.zip"][mask_name] = _nifti_bytes(tmp, lungs + 0, img)
    for zname, members in files.items():
        with zipfile.ZipFile(root / zname, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)


def test_covid19_ct_seg_from_local_mirror(server, tmp_path):
    root, url = server
    _covid_zips(root, tmp_path)
    img, lab, _ = make_phantom(11, shape=(6, 40, 40), positive=True)  # the radiopaedia case, before 8 bits
    truth_lung_hu = sitk.GetArrayFromImage(img)[sitk.GetArrayFromImage(lab) == 1]
    dest = tmp_path / "data"
    rc = main(["-q", "download", "covid19-ct-seg", "--dest", str(dest), "--base-url", url, "--no-verify"])
    assert rc == 0
    out = dest / "covid19_ct_seg"
    rows = list(csv.DictReader(open(out / "dataset.csv")))
    assert {r["id"] for r in rows} == {"coronacases_001", "radiopaedia_14_85914_0"}
    assert {r["group_id"] for r in rows} == {"majun20_coronacases_001", "majun20_radiopaedia_14"}
    conv = {r["id"]: r["converted_from"] for r in rows}
    assert conv == {"coronacases_001": "hu", "radiopaedia_14_85914_0": "8bit-auto"}
    for r in rows:
        img = sitk.ReadImage(str(out / r["image"]))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / r["label"])))
        assert sitk.GetArrayViewFromImage(img).min() < -500  # Hounsfield units, also the 8-bit case
        assert set(np.unique(lab)) == {0, 1, 2}
        if r["converted_from"] == "8bit-auto":  # one calibration per volume puts its lungs near real lung HU
            hu = sitk.GetArrayViewFromImage(img)
            assert abs(np.median(hu[lab == 1]) - np.median(truth_lung_hu)) < 100
    assert not (dest / ".covid19_ct_seg_archives").exists()  # archives removed after preparing
    s = load_prepared(out, size=32)
    assert len(s) == 12 and set(np.unique(s.slices.infection)) <= {0, 1} and s.slices.infection.any()


def test_checksum_mismatch_is_a_clear_error(server, tmp_path, capsys):
    root, url = server
    _covid_zips(root, tmp_path)
    rc = main(["-q", "download", "covid19-ct-seg", "--dest", str(tmp_path / "d"), "--base-url", url])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHA-256" in err[0] and "COVID-19-CT-Seg_20cases.zip" in err[0]


def test_checksum_verified_when_it_matches(server, tmp_path, monkeypatch):
    root, url = server
    _covid_zips(root, tmp_path)
    spec = dl.REGISTRY["covid19-ct-seg"]
    files = [replace(f, sha256=file_sha256(root / f.name)) for f in spec.files]
    monkeypatch.setitem(dl.REGISTRY, "covid19-ct-seg", replace(spec, files=files))
    s = dl.download("covid19-ct-seg", tmp_path / "d", base_url=url, include_optional=True, keep_archives=True,
                    progress=False)
    assert s["cases"] == 2 and "non-commercial" in s["license"]
    assert (tmp_path / "d" / ".covid19_ct_seg_archives" / "Lung_and_Infection_Mask.zip").is_file()


def test_missing_file_on_server(server, tmp_path, capsys):
    root, url = server  # empty mirror
    rc = main(["-q", "download", "covid19-ct-seg", "--dest", str(tmp_path / "d"), "--base-url", url, "--no-verify"])
    assert rc == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_ucsd_covid_ct_from_local_mirror(server, tmp_path):
    from PIL import Image

    root, url = server
    pic = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)).save(pic)
    with zipfile.ZipFile(root / "CT_COVID.zip", "w") as z:
        for n in ("2020.01.24.919183-p27-132.png", "2020.01.24.919183-p27-133.png", "PIIS0140673620303603%7.png"):
            z.write(pic, f"CT_COVID/{n}")
    with zipfile.ZipFile(root / "CT_NonCOVID.zip", "w") as z:
        for n in ("1%0.jpg", "1%1.jpg", "2.png"):
            z.write(pic, f"CT_NonCOVID/{n}")
    rc = main(["-q", "download", "ucsd-covid-ct", "--dest", str(tmp_path / "d"), "--base-url", url])
    assert rc == 0
    out = tmp_path / "d" / "ucsd_covid_ct"
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 6 and sum(int(r["label"]) for r in rows) == 3
    groups = {r["path"]: r["group_id"] for r in rows}
    assert groups["covid/2020.01.24.919183-p27-132.png"] == groups["covid/2020.01.24.919183-p27-133.png"]
    assert groups["noncovid/1%0.jpg"] == groups["noncovid/1%1.jpg"] != groups["noncovid/2.png"]
    s = load_prepared(out, size=32)
    assert set(s.slices.cls.tolist()) == {0, 1}


def test_manual_sets_and_list(capsys, tmp_path):
    assert main(["download", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "covid19-ct-seg" in listing and "mosmed" in listing
    assert main(["-q", "download", "mosmed", "--dest", str(tmp_path)]) == 2
    assert "cannot be downloaded automatically" in capsys.readouterr().err
    assert main(["-q", "download", "nope", "--dest", str(tmp_path)]) == 2


def test_unsafe_zip_member_refused(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../escape.txt", "x")
    with pytest.raises(dl.DownloadError, match="unsafe"):
        dl.unpack(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_case_ids():
    assert dl.case_id("coronacases_org_case007.nii") == "coronacases_007"
    assert dl.case_id("coronacases_010.nii.gz") == "coronacases_010"
    assert dl.case_id("radiopaedia_org_covid-19-pneumonia-10_85902_3-dcm.nii.gz") == "radiopaedia_10_85902_3"
    assert dl.case_id("radiopaedia_10_85902_3.nii.gz") == "radiopaedia_10_85902_3"
