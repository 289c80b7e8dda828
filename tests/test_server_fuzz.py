"""Seeded mutation fuzzing of uploads against the real server, short version (benchmarks/fuzz_uploads.py: 100
mutations of NIfTI, NRRD, MHA and DICOM-zip phantoms, seed 32): every answer a 2xx with the volume SimpleITK
reads from the upload, or a 4xx with a message; never a 5xx or a hang; the server's memory bounded."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from server_fixture import http, server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
RSS_GROWTH_MB = 400  # the stated bound: the server's (and its children's) RSS after the run vs before


def test_hundred_mutated_uploads(server, tmp_path):  # noqa: F811
    from fuzz_uploads import run

    res = run(server.url, n=100, seed=32, out=tmp_path / "crashers", pid=server.proc.pid, timeout_s=60,
              log=lambda *_: None)
    assert res["failures"] == [], res["failures"][:5]
    assert set(res["status_counts"]) <= set(range(200, 300)) | set(range(400, 500)), res["status_counts"]
    assert res["counts"].get("2xx", 0) >= 5 and res["counts"].get("4xx", 0) >= 30, res["counts"]
    before, after = res["rss_mb"][0], res["rss_mb"][-1]
    assert after - before < RSS_GROWTH_MB, res["rss_mb"]
    ids = http().get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert not [i for i in ids if i.startswith("fuzz_")], "accepted fuzz images were not deleted"


CORPUS = Path(__file__).resolve().parent / "data" / "fuzz_corpus"


def _corpus():
    import json

    return sorted(json.loads((CORPUS / "manifest.json").read_text()).items())


@pytest.mark.parametrize("name,expected", _corpus())
def test_fuzz_corpus(server, name, expected):  # noqa: F811
    """The crashers the fuzzer found, kept: each answers as the manifest says, and an accepted one deletes."""
    s = http()
    data = (CORPUS / name).read_bytes()
    image = "corpus_" + name.split(".")[0]
    r = s.put(f"{server.url}/datastore/image", params={"image": image}, files={"file": (name, data)}, timeout=120)
    assert r.status_code == expected["status"], (name, r.status_code, r.text)
    if r.status_code == 200:
        for _ in range(3):  # the delete / reconcile race: it must hold every time
            assert s.get(f"{server.url}/datastore/image/info", params={"image": image}, timeout=30).status_code == 200
            assert s.delete(f"{server.url}/datastore/image", params={"id": image}, timeout=30).status_code == 200
            assert s.get(f"{server.url}/datastore/image/info", params={"image": image}, timeout=30).status_code == 404
            r = s.put(f"{server.url}/datastore/image", params={"image": image}, files={"file": (name, data)},
                      timeout=120)
            assert r.status_code == 200, r.text
        assert s.delete(f"{server.url}/datastore/image", params={"id": image}, timeout=30).status_code == 200
    else:
        assert expected["detail"] in r.json()["detail"], r.text


def test_dicom_series_with_a_missing_slice_is_refused(server, tmp_path):  # noqa: F811
    """Found with the duplicated slice: GDCM reads a gap as a normal slice distance (the volume comes out shorter)."""
    import io
    import zipfile

    src = zipfile.ZipFile(CORPUS / "dicom_duplicated_slice.zip")
    names = sorted(n for n in src.namelist() if not n.endswith(".copy.dcm"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n in names[:3] + names[4:]:
            z.writestr(n, src.read(n))
    r = http().put(f"{server.url}/datastore/image", params={"image": "corpus_gap"},
                   files={"file": ("gap.zip", buf.getvalue())}, timeout=120)
    assert r.status_code == 422 and "not evenly spaced" in r.json()["detail"], r.text
