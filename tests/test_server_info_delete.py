"""Unknown ids on the info routes answer 404 (never 200 ``{}``), and a final label is deleted only by the admin
(on this open test server nobody is: 403, the label byte-identical afterwards), against the real server."""
from __future__ import annotations

import hashlib

import pytest
from server_fixture import LABELLED, http, phantom_files, server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.server

UNKNOWN_IDS = ["no_such_image", "../../etc/passwd", "/etc/passwd", "..", "phantom_000/../phantom_001", "x" * 300,
               "phantom_000.nii.gz", " phantom_000", "%2e%2e%2fetc", "\u00e9t\u00e9"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("image", UNKNOWN_IDS)
def test_image_info_of_an_unknown_id_is_404(server, image):  # noqa: F811
    r = http().get(f"{server.url}/datastore/image/info", params={"image": image}, timeout=30)
    assert r.status_code == 404, (image, r.status_code, r.text)
    assert "not in the datastore" in r.json()["detail"] and "root:" not in r.text


@pytest.mark.parametrize("label", UNKNOWN_IDS + ["phantom_004"])  # phantom_004: an image without a final label
def test_label_info_of_an_unknown_label_is_404(server, label):  # noqa: F811
    r = http().get(f"{server.url}/datastore/label/info", params={"label": label, "tag": "final"}, timeout=30)
    assert r.status_code == 404, (label, r.status_code, r.text)


def test_info_of_known_ids_and_unknown_tags(server):  # noqa: F811
    s = http()
    r = s.get(f"{server.url}/datastore/image/info", params={"image": LABELLED[0]}, timeout=30)
    assert r.status_code == 200 and r.json(), r.text
    r = s.get(f"{server.url}/datastore/label/info", params={"label": LABELLED[0], "tag": "final"}, timeout=30)
    assert r.status_code == 200 and isinstance(r.json(), dict), r.text
    for tag in ("original", "../final", "no_such_tag"):
        r = s.get(f"{server.url}/datastore/label/info", params={"label": LABELLED[0], "tag": tag}, timeout=30)
        assert r.status_code == 404, (tag, r.status_code, r.text)
    # a missing parameter stays FastAPI's 422 (the request is malformed, not the id unknown)
    assert s.get(f"{server.url}/datastore/image/info", timeout=30).status_code == 422


def test_a_final_label_is_not_deleted_without_the_admin(server):  # noqa: F811
    s = http()
    label = server.studies / "labels" / "final" / f"{LABELLED[1]}.nii.gz"
    before = _sha(label)
    for path, params in (("/datastore/label", {"id": LABELLED[1], "tag": "final"}),
                         ("/datastore/image", {"id": LABELLED[1]}), ("/datastore/", {"id": LABELLED[1]})):
        r = s.delete(server.url + path, params=params, timeout=30)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "only an admin may delete" in r.json()["detail"]
    assert _sha(label) == before
    r = s.get(f"{server.url}/datastore/label/info", params={"label": LABELLED[1], "tag": "final"}, timeout=30)
    assert r.status_code == 200


def test_other_labels_and_unlabelled_images_can_still_be_deleted(server, tmp_path):  # noqa: F811
    s = http()
    img, lab, _, _ = phantom_files(tmp_path, seed=21)
    r = s.put(f"{server.url}/datastore/image", params={"image": "info_delete_case"},
              files={"file": ("c.nii.gz", img.read_bytes())}, timeout=120)
    assert r.status_code == 200, r.text
    r = s.put(f"{server.url}/datastore/label", params={"image": "info_delete_case", "tag": "draft"},
              files={"label": ("l.nii.gz", lab.read_bytes()), "params": (None, "{}")}, timeout=120)
    assert r.status_code == 200, r.text
    assert s.get(f"{server.url}/datastore/label/info", params={"label": "info_delete_case", "tag": "draft"},
                 timeout=30).status_code == 200
    assert s.delete(f"{server.url}/datastore/label", params={"id": "info_delete_case", "tag": "draft"},
                    timeout=30).status_code == 200
    assert s.get(f"{server.url}/datastore/label/info", params={"label": "info_delete_case", "tag": "draft"},
                 timeout=30).status_code == 404
    assert s.delete(f"{server.url}/datastore/image", params={"id": "info_delete_case"}, timeout=30).status_code == 200
    assert s.get(f"{server.url}/datastore/image/info", params={"image": "info_delete_case"},
                 timeout=30).status_code == 404
