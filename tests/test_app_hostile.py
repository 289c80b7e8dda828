"""The bad-input corpus (tests/hostile_inputs.py) against the real server: for every kind, the status, a
message that names the problem, the studies and model folders byte-identical afterwards and no temporary
file left behind. Plus what the corpus cannot express: CORS, memory under a header bomb, and a real
upload still accepted (the checks refuse only what is wrong)."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from hostile_inputs import CORPUS, ESCAPE, _header_bomb, put_image
from server_fixture import http, phantom_files, server, studies_digest, wait_training_idle  # noqa: F401 (fixture)

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _digest(folder: Path) -> dict:
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name not in (".store.lock",):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _leftovers(live) -> list:
    return sorted(str(p.relative_to(live.tmp)) for p in live.tmp.rglob("*"))


def test_corpus_has_at_least_40_kinds():
    kinds = [c.kind for c in CORPUS]
    assert len(kinds) >= 40 and len(set(kinds)) == len(kinds)


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_hostile_input_is_refused_cleanly(server, tmp_path, case):
    wait_training_idle(server)
    studies, model = studies_digest(server.studies), _digest(server.model_dir)
    resp = case.send(server, tmp_path)
    assert resp.status_code == case.status, f"{case.kind}: {resp.status_code} {resp.text[:500]}"
    detail = resp.json().get("detail") if resp.request.method != "HEAD" else "(a HEAD answer has no body)"
    assert isinstance(detail, str) and detail, resp.text
    for w in case.words:
        assert w.lower() in detail.lower(), f"{case.kind}: {detail!r} lacks {w!r}"
    assert str(server.workdir) not in detail and "hybrid_ct_upload" not in detail, f"a server path: {detail}"
    assert studies_digest(server.studies) == studies, f"{case.kind}: the studies folder changed"
    assert _digest(server.model_dir) == model, f"{case.kind}: the model folder changed"
    assert _leftovers(server) == [], f"{case.kind}: temporary files left: {_leftovers(server)}"
    escaped = [p for folder in (Path("/"), Path("/tmp"), server.workdir.parent) for p in folder.glob(f"{ESCAPE}*")] \
        if case.kind.startswith(("session", "zip member")) else []
    assert escaped == [], f"{case.kind}: files written outside the studies folder: {escaped}"
    assert server.alive()


def test_cors_reflects_no_foreign_origin_and_never_credentials(server):
    r = http().get(f"{server.url}/info/", headers={"Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 200
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    assert "access-control-allow-credentials" not in {k.lower() for k in r.headers}
    pre = http().options(f"{server.url}/datastore/", headers={"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method": "PUT"}, timeout=30)
    assert pre.headers.get("access-control-allow-origin") is None


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_header_bomb_costs_no_memory(server, tmp_path):
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _peak_rss_mb(pid)
    bomb = _header_bomb()
    assert len(bomb) < 100 and len(gzip.decompress(bomb)) == 352
    r = put_image("bomb again", "bomb.nii.gz", bomb)(server, tmp_path)
    assert r.status_code == 422, r.text
    grown = _peak_rss_mb(pid) - before
    assert grown < 100, f"the server's peak memory grew by {grown:.0f} MB for a 65-byte upload"


def test_a_whole_ct_is_still_accepted_in_every_format(server, tmp_path):
    import SimpleITK as sitk

    _, _, img, _ = phantom_files(tmp_path, seed=77)
    img = sitk.Cast(img, sitk.sitkInt16)
    for i, ext in enumerate((".nii.gz", ".nii", ".nrrd", ".mha")):
        p = tmp_path / f"ok{ext}"
        sitk.WriteImage(img, str(p), useCompression=ext != ".nii")
        r = put_image(f"whole ct {i}", f"ok{ext}", p.read_bytes())(server, tmp_path)
        assert r.status_code == 200, f"{ext}: {r.text}"
    assert _leftovers(server) == []
    for i in range(4):
        assert http().delete(f"{server.url}/datastore/", params={"id": f"whole ct {i}"}, timeout=60).status_code == 200
