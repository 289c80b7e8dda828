"""Qt-free logic of the Slicer extension: segments by name, result strings, URLs, multipart answers, errors.

Happy-path exchanges with the server are tested against the REAL MONAI Label app in
test_slicer_server_flow.py; the tiny http.server stubs here only produce error answers.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import warnings

import numpy as np
import pytest

import requests

from hybrid_ct_slicer.client import APP_ROLLBACK, APP_VERSIONS, HybridCTClient, ServerError, _detail_from_body
from hybrid_ct_slicer.results import (NA, format_results, format_train_status, format_version_entry,
                                      results_text)
from hybrid_ct_slicer.segments import (LABEL_INFO, SegmentError, SegmentWarning, canonical_segment_name,
                                       export_labelmap_by_name, server_label_info, split_labelmap,
                                       terminology_entry)
from hybrid_ct_slicer.settings import is_valid_server_url, normalise_server_url
from hybrid_ct_slicer.testdata import make_chest_volume

EXPECTED_LABEL_INFO = [{"name": "lung", "idx": 1}, {"name": "right_lung", "idx": 3}, {"name": "left_lung", "idx": 4},
                       {"name": "infection", "idx": 2}]


# ------------------------------------------------------------------------------ segments
@pytest.fixture(scope="module")
def phantom_label():
    """The label as the server returns it: right lung 3, left lung 4, infection 2."""
    _, label, _ = make_chest_volume(shape=(8, 32, 32))
    assert set(np.unique(label).tolist()) == {0, 2, 3, 4}
    return label


@pytest.fixture(scope="module")
def unsided_label():
    """A label drawn before the sides: lung 1 for both, infection 2."""
    _, label, _ = make_chest_volume(shape=(8, 32, 32), sides=False)
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    return label


def _masks(label):
    return {"Right lung": label == 3, "Left lung": label == 4, "Infection": label == 2}


def test_export_by_name_in_either_order(phantom_label):
    masks = _masks(phantom_label)
    forward, info = export_labelmap_by_name(dict(masks))
    backward, info2 = export_labelmap_by_name(dict(reversed(list(masks.items()))))
    assert forward.dtype == np.uint8
    assert np.array_equal(forward, phantom_label)
    assert np.array_equal(backward, phantom_label)
    assert info == info2 == EXPECTED_LABEL_INFO


def test_export_accepts_case_and_synonyms(phantom_label):
    masks = _masks(phantom_label)
    out, _ = export_labelmap_by_name({"GGO": masks["Infection"].astype(np.uint8), "lung_right": masks["Right lung"],
                                      "LEFT LUNG": masks["Left lung"]})
    assert np.array_equal(out, phantom_label)
    assert canonical_segment_name("  lung_parenchyma ") == "Lung"
    assert canonical_segment_name("Lungs-Left") == "Left lung" and canonical_segment_name("right_lung") == "Right lung"
    assert canonical_segment_name("Ground-glass opacity") == "Infection"
    assert canonical_segment_name("Label_1") is None  # never guessed from position-style names


def test_infection_overrides_lung_where_they_overlap(phantom_label):
    right_whole = np.isin(phantom_label, (2, 3)) & (np.indices(phantom_label.shape)[2] < 16)  # covers the infection
    left_whole = np.isin(phantom_label, (2, 4)) & (np.indices(phantom_label.shape)[2] >= 16)
    out, _ = export_labelmap_by_name({"Infection": phantom_label == 2, "Left lung": left_whole,
                                      "Right lung": right_whole})
    assert np.array_equal(out, phantom_label)


def test_one_lung_segment_stands_for_both_sides(unsided_label):
    """A segmentation drawn before the sides (one "Lung") is sent as lung without a side (value 1)."""
    out, info = export_labelmap_by_name({"Lung": unsided_label == 1, "Infection": unsided_label == 2})
    assert np.array_equal(out, unsided_label) and info == EXPECTED_LABEL_INFO
    parts = split_labelmap(unsided_label)
    assert list(parts) == ["Lung", "Right lung", "Left lung", "Infection"]  # Lung only because the map holds 1
    assert not parts["Right lung"].any() and not parts["Left lung"].any()
    assert np.array_equal(export_labelmap_by_name(parts)[0], unsided_label)


def test_extra_segment_refused_with_its_name(phantom_label):
    masks = _masks(phantom_label)
    masks["Heart"] = np.zeros_like(phantom_label, bool)
    with pytest.raises(SegmentError, match="'Heart'") as err:
        export_labelmap_by_name(masks)
    assert "Ignore other segments" in str(err.value)


def test_extra_segment_ignored_with_warning(phantom_label):
    masks = {"Tumour": phantom_label > 0, **_masks(phantom_label), "Heart": phantom_label > 0}
    with pytest.warns(SegmentWarning, match="'Tumour', 'Heart'"):
        out, _ = export_labelmap_by_name(masks, ignore_extra=True)
    assert np.array_equal(out, phantom_label)  # extra segments contribute nothing


def test_missing_segment_is_an_error(phantom_label):
    with pytest.raises(SegmentError, match="'Infection' is missing"):
        export_labelmap_by_name({"Lung": phantom_label > 0})
    with pytest.raises(SegmentError, match="'Left lung' is missing"):
        export_labelmap_by_name({"Right lung": phantom_label == 3, "Infection": phantom_label == 2})
    with pytest.raises(SegmentError, match="no segments"):
        export_labelmap_by_name({})
    # explicitly allowed partial export
    out, _ = export_labelmap_by_name({"Right lung": phantom_label == 3}, require_all=False)
    assert set(np.unique(out).tolist()) == {0, 3}


def test_two_segments_with_one_meaning_refused(phantom_label):
    masks = _masks(phantom_label)
    masks["lung left"] = masks["Left lung"]
    with pytest.raises(SegmentError, match="both mean 'Left lung'"):
        export_labelmap_by_name(masks)


def test_shape_mismatch_refused():
    with pytest.raises(SegmentError, match="differ in shape"):
        export_labelmap_by_name({"Lung": np.zeros((2, 3, 4)), "Infection": np.zeros((2, 3, 5))})


def test_split_labelmap_and_unknown_values(phantom_label):
    parts = split_labelmap(phantom_label)
    assert list(parts) == ["Right lung", "Left lung", "Infection"]
    out, _ = export_labelmap_by_name(parts)
    assert np.array_equal(out, phantom_label)
    bad = phantom_label.copy()
    bad[0, 0, 0] = 5
    with pytest.raises(SegmentError, match=r"\[5\]"):
        split_labelmap(bad)


def test_label_info_and_terminology():
    assert server_label_info() == EXPECTED_LABEL_INFO
    assert [d["name"] for d in LABEL_INFO] == ["Right lung", "Left lung", "Infection"]
    lung = terminology_entry("Lung")
    assert "SCT^123037004^Anatomical Structure~SCT^39607008^Lung~^^~" in lung
    right, left = terminology_entry("Right lung"), terminology_entry("Left lung")
    assert "SCT^123037004^Anatomical Structure~SCT^39607008^Lung~SCT^24028007^Right~" in right
    assert "SCT^123037004^Anatomical Structure~SCT^39607008^Lung~SCT^7771000^Left~" in left
    inf = terminology_entry("Infection")
    # Inflammation (CID 7159) is in Slicer's DICOM master list; "Lesion" (SCT 52988006) is in none
    assert "SCT^49755003^Morphologically Altered Structure~SCT^23583003^Inflammation~^^~" in inf
    assert inf.endswith("~SCT^39607008^Lung~^^")  # anatomic region: lung; no stray '|' (a tag separator)
    assert all(len(e.split("~")) == 7 for e in (inf, lung, right, left))


# ------------------------------------------------------------------------------ results
FULL_REPORT = {
    "classification": {"label": "positive", "probability": 0.873, "firing_rates": [0.1, 0.7]},
    "burden": {"total_pct": 31.25, "left_pct": 20.0, "right_pct": 40.5},
    "grade": "CT-2",
    "energy": {"e_hybrid_uj": 12.0, "e_conv_uj": 80.0, "ratio": 0.15, "mean_firing_rate": 0.042},
    "latency_s": 12.34,
    "model_version": "20260101-120000",
    "label_names": {"lung": 1, "infection": 2},
}


def test_results_full_report():
    d = format_results(FULL_REPORT)
    assert d["classification"] == "Positive (P(positive) = 0.87)"
    assert d["burden"] == "31.2 % of lung (left 20.0 %, right 40.5 %)"
    assert d["grade"] == "CT-2 (25-50 % of lung)"
    assert d["energy"].startswith("0.150 (85 % less than the CNN)")
    assert "12 uJ vs 80 uJ" in d["energy"] and "firing rate 4.2 %" in d["energy"]
    assert d["model_version"] == "20260101-120000"
    assert d["latency"] == "12.3 s"
    assert "Severity grade: CT-2" in results_text(FULL_REPORT)


def test_results_robust_to_missing_and_bad_values():
    assert set(format_results({}).values()) == {NA}
    assert set(format_results(None).values()) == {NA}
    assert set(format_results("not a dict").values()) == {NA}
    bad = {"classification": {"label": None, "probability": "nan"}, "burden": {"total_pct": "x"},
           "grade": 3, "energy": {"ratio": None}, "model_version": "", "latency_s": float("inf")}
    assert set(format_results(bad).values()) == {NA}
    partial = format_results({"classification": {"probability": 0.2}, "burden": {"total_pct": 0}})
    assert partial["classification"] == "Negative (P(positive) = 0.20)"
    assert partial["burden"] == "0.0 % of lung"
    # ratio computed from the energies when missing; report nested under "report"
    nested = format_results({"report": {"energy": {"e_hybrid_uj": 1.0, "e_conv_uj": 4.0}}, "latencies": {}})
    assert nested["energy"].startswith("0.250")
    assert format_results({"latencies": {"total": 2.0}})["latency"] == "2.0 s"


def test_train_status_and_versions_strings():
    status, metric = format_train_status(None, {})
    assert "never run" in status and metric == "Best metric: n/a"
    task = {"status": "RUNNING", "start_ts": "2026-01-01 10:00:00", "details": ["epoch 1", "epoch 2 loss 0.3"]}
    status, metric = format_train_status(task, {"best_metric": 0.8123, "best_metric_epoch": 2}, running=True)
    assert status.startswith("Training: running (since 2026-01-01 10:00:00)")
    assert "epoch 2 loss 0.3" in status
    assert metric == "Best metric: 0.8123 (epoch 2)"
    entry = format_version_entry({"version": "v2", "created": "2026-01-02", "metric": 0.75}, current="v2")
    assert entry == "v2  metric 0.7500  (2026-01-02)  [current]"
    assert format_version_entry("v1") == "v1"


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("raw, expected", [
    ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
    ("  HTTPS://Example.org:8443//  ", "https://example.org:8443"),
    ("127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("localhost", "http://localhost"),
    ("http://host/monailabel/", "http://host/monailabel"),
    ("http://[::1]:8000", "http://[::1]:8000"),
])
def test_url_normalised(raw, expected):
    assert normalise_server_url(raw) == expected


@pytest.mark.parametrize("raw, message", [
    ("", "empty"), (None, "empty"), ("ftp://host", "http:// or https://"), ("file:///etc/passwd", "http"),
    ("http://", "no host"), ("http://host:99999", "invalid port"), ("http://user:pw@host", "password"),
    ("http://host/?a=1", "'?' or '#'"),
])
def test_url_refused(raw, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        normalise_server_url(raw)
    assert not is_valid_server_url(raw)


# ------------------------------------------------------------------------------ multipart
def test_multipart_answer_read_binary_safe():
    """A multipart body as requests encodes it (what we send) is read back byte for byte."""
    payload = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n\r\n"
    req = requests.Request("POST", "http://x/", files={"params": (None, json.dumps({"a": "é"})),
                                                       "label": ("x.nii.gz", payload)}).prepare()
    res = HybridCTClient.parse_infer_response(req.headers, req.body)
    assert res.params == {"a": "é"}
    assert res.label == payload and res.label_filename == "x.nii.gz"


def test_parse_infer_response_as_monailabel_sends_it():
    """The server builds its answer with requests_toolbelt's MultipartEncoder (monailabel.endpoints.infer)."""
    toolbelt = pytest.importorskip("requests_toolbelt")
    label = b"\x1f\x8b" + bytes(range(256)) + b"\r\n\r\n"
    enc = toolbelt.MultipartEncoder(fields={
        "params": (None, json.dumps(FULL_REPORT), "application/json"),
        "image": ("case 1_label.nii.gz", label, "application/gzip"),
    })
    res = HybridCTClient.parse_infer_response({"Content-Type": enc.content_type}, enc.to_string())
    assert res.params == FULL_REPORT
    assert res.label == label and res.label_filename == "case 1_label.nii.gz"
    # output=json and output=image answers
    headers = {"content-type": "application/json"}
    assert HybridCTClient.parse_infer_response(headers, b'{"grade": "CT-0"}').params == {"grade": "CT-0"}
    headers = {"Content-Type": "application/gzip", "Content-Disposition": 'attachment; filename="lab.nii.gz"'}
    res = HybridCTClient.parse_infer_response(headers, label)
    assert res.label == label and res.label_filename == "lab.nii.gz" and res.params == {}


def test_infer_response_save_label(tmp_path):
    from hybrid_ct_slicer.client import InferResponse
    r = InferResponse(params={}, label=b"abc", label_filename="../../etc/x.seg.nrrd")
    path = r.save_label(str(tmp_path), stem="id/with?odd chars")
    assert path.startswith(str(tmp_path)) and path.endswith(".seg.nrrd")
    assert open(path, "rb").read() == b"abc"


def test_detail_extraction():
    assert _detail_from_body(b'{"detail": "Image NOT Found"}', "x") == "Image NOT Found"
    validation = {"detail": [{"loc": ["query", "image"], "msg": "field required", "type": "missing"}]}
    assert _detail_from_body(json.dumps(validation).encode(), "x") == "query.image: field required"
    assert _detail_from_body(b"Internal Server Error", "x") == "Internal Server Error"
    assert _detail_from_body(b"", "fallback") == "fallback"


def test_image_ids_never_come_from_volume_names():
    """Issue 17: ids come from DICOM UIDs or the content; they are valid server ids (no path parts)."""
    from hybrid_ct_slicer import workflow
    from hybrid_ct_slicer.identity import derive_image_id

    assert not hasattr(workflow, "make_image_id")
    content = "ab" * 32
    for image_id in (derive_image_id(content), derive_image_id(content, series_uid="1.2.840.1"),
                     derive_image_id(content, instance_uids="1.2.3 1.2.4")):
        assert re.fullmatch(r"(ct|dcm)-[0-9a-f-]+", image_id) and len(image_id) <= 64


def test_ids_are_quoted():
    c = HybridCTClient("http://127.0.0.1:1")
    assert c._url("/datastore/image", {"image": "a/b?c#d e&f"}) == \
        "http://127.0.0.1:1/datastore/image?image=a%2Fb%3Fc%23d+e%26f"
    from hybrid_ct_slicer.client import API_INFER, _q
    assert API_INFER.format(model=_q("../train")) == "/infer/..%2Ftrain"


# ------------------------------------------------------------------------------ error messages
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_message():
    port = _free_port()  # bound then closed: nothing listens there
    client = HybridCTClient(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(ServerError) as err:
        client.info()
    assert err.value.kind == "unreachable"
    assert str(err.value).startswith(f"The MONAI Label server at http://127.0.0.1:{port} is not reachable: "
                                     f"is it running?")
    assert "connection refused" in str(err.value)


def test_dns_failure_message(monkeypatch):
    def fail(*_a, **_k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    client = HybridCTClient("http://no-such-host.invalid:8000", timeout=5)
    with pytest.raises(ServerError, match=r"is not reachable: is it running\? \(host name not found") as err:
        client.info()
    assert err.value.kind == "unreachable"


def test_timeout_message():
    # A listening socket that never accepts: the TCP connect succeeds (backlog), no answer ever comes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        client = HybridCTClient(f"http://127.0.0.1:{port}", timeout=0.3)
        with pytest.raises(ServerError) as err:
            client.info()
    assert err.value.kind == "timeout"
    assert "did not answer within 0.3 s (GET /info/)" in str(err.value)


class _ErrorStub(http.server.BaseHTTPRequestHandler):
    """Answers every request with an error, records the request line."""

    seen: list = []

    def _reply(self):
        self.server.seen.append((self.command, self.path))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/datastore/image"):
            status, body = 404, {"detail": "Image NOT Found"}
        elif self.path.startswith("/infer/"):
            status, body = 422, {"detail": [{"loc": ["query", "image"], "msg": "field required"}]}
        elif self.path.startswith("/train/") and self.command == "GET":
            status, body = 404, {"detail": "No Train Tasks Found"}
        elif self.path.startswith(APP_VERSIONS):
            status, body = 404, {"detail": "Not Found"}
        elif self.path.startswith("/activelearning/"):  # what an unhandled exception looks like
            self.send_response(500)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "21")
            self.end_headers()
            self.wfile.write(b"Internal Server Error")
            return
        else:
            status, body = 500, {"detail": "Failed to execute infer: CUDA out of memory"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _reply

    def log_message(self, *args):
        pass


@pytest.fixture()
def error_stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ErrorStub)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_http_errors_carry_the_server_detail(error_stub):
    url = f"http://127.0.0.1:{error_stub.server_address[1]}"
    client = HybridCTClient(url + "/", timeout=5)
    with pytest.raises(ServerError) as err:
        client.info()
    assert err.value.kind == "http" and err.value.status == 500
    assert str(err.value) == (f"The server at {url} answered HTTP 500 to GET /info/: "
                              "Failed to execute infer: CUDA out of memory")
    with pytest.raises(ServerError, match="HTTP 422 .*query.image: field required"):
        client.infer("hybrid_ct", "img")
    with pytest.raises(ServerError, match="HTTP 500 to POST /train/hybrid_ct"):
        client.train_start("hybrid_ct", {"max_epochs": 1})
    with pytest.raises(ServerError, match=f"HTTP 404 to GET {APP_VERSIONS}: Not Found"):
        client.model_versions()
    with pytest.raises(ServerError, match=f"HTTP 500 to POST {APP_ROLLBACK}"):
        client.rollback("v1")
    with pytest.raises(ServerError, match="Internal Server Error \\(an unhandled error: the server log has"):
        client.next_sample("random")
    # 404 is an answer, not an error, for these two
    assert client.has_image("case/1 ?#") is False
    assert client.train_status() is None
    assert ("HEAD", "/datastore/image?image=case%2F1+%3F%23") in error_stub.seen


def test_submit_refuses_before_sending(error_stub, phantom_label):
    """A segment error is reported before anything reaches the server."""
    from hybrid_ct_slicer.imageio import Geometry
    from hybrid_ct_slicer.workflow import Workflow
    url = f"http://127.0.0.1:{error_stub.server_address[1]}"
    wf = Workflow(HybridCTClient(url, timeout=5))
    with pytest.raises(SegmentError, match="'Heart'"):
        wf.submit_correction("img", {**_masks(phantom_label), "Heart": phantom_label > 0}, Geometry())
    assert error_stub.seen == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ignored segments are reported in the result, not as warnings
        with pytest.raises(ServerError, match="HTTP 500 to PUT /datastore/label"):
            wf.submit_correction("img", {**_masks(phantom_label), "Heart": phantom_label > 0}, Geometry(),
                                 ignore_extra=True)
    assert error_stub.seen[-1] == ("PUT", "/datastore/label?image=img&tag=final")


# ------------------------------------------------------------------------------ files
def _rotated_geometry():
    from hybrid_ct_slicer.imageio import Geometry
    th = 0.3
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]) @ np.diag([1, 1, -1])
    return Geometry((0.7, 0.8, 2.5), (-10.5, 20.25, 30.0), tuple(rot.reshape(-1)))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd"])
def test_label_files_keep_voxels_and_geometry(tmp_path, phantom_label, ext):
    """A rotated, anisotropic label map survives the file (SimpleITK, as on the server) unchanged."""
    from hybrid_ct_slicer.imageio import read_image, write_image
    geometry = _rotated_geometry()
    path = write_image(str(tmp_path / f"label{ext}"), phantom_label, geometry)
    arr, geom = read_image(path)
    assert arr.dtype == np.uint8 and np.array_equal(arr, phantom_label) and geom.almost_equal(geometry)


def test_geometry_ras_conversion():
    from hybrid_ct_slicer.imageio import Geometry
    g = _rotated_geometry()
    ras = g.ijk_to_ras()
    assert np.allclose(ras[:2, :], -g.ijk_to_lps()[:2, :]) and np.allclose(ras[2], g.ijk_to_lps()[2])
    assert Geometry.from_ijk_to_ras(ras).almost_equal(g)
    with pytest.raises(ValueError, match="positive"):
        Geometry(spacing=(1, 0, 1))


def test_panel_shows_the_combined_answer_and_the_density_warning():
    """Issue 27: the call's wording and the density guard from the contract reach the results panel."""
    from hybrid_ct_slicer.segments import CONTRACT

    call, dens = CONTRACT["report"]["call"], CONTRACT["report"]["lung_density"]
    report = {"classification": {"label": "indeterminate", "probability": 0.31, "calibrated": False,
                                 "infection_found": True, call["key"]: call["text"]["indeterminate_outlined"]},
              "burden": {"total_pct": 40.0, "left_pct": 41.0, "right_pct": 39.0},
              dens["key"]: {"median_hu": -690.0, "max_median_hu": -750.0, "warning": dens["warning"]}}
    d = format_results(report)
    assert d["classification"].startswith("Indeterminate (score 0.31, not calibrated) - infection outlined")
    assert "median -690 HU - WARNING: expiration or free-breathing scan" in d["burden"]
    report[dens["key"]]["note"] = dens["standardise"]["note"].format(shift=160.0)  # the server's standardisation
    assert "(lung parenchyma 160 HU denser than in training: mapped back before the network)" in format_results(report)["burden"]
    report["classification"] = {"label": "positive", "probability": 0.9, call["key"]: call["text"]["positive"]}
    assert format_results(report)["classification"] == "Positive (P(positive) = 0.90) - infection pattern found"
