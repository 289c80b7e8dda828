"""Faults at the worst moment, against the real server; after each, the stores are checked: the current
pointer names a servable version, every version loads (and matches the hash written at publish), the final
labels are byte-identical, and no temporary file is left (model folder, studies folder, the server's TMPDIR).

- SIGKILL of the server at each step of publishing a model (the training subprocess kills the server and
  itself at the step named by ``$HYBRID_CT_FAULT_AT``: ``lib/recovery.fault_point``), then a restart;
- SIGKILL during an upload: while the body streams in, while the image's part file is written, while the
  datastore index is replaced, while a final label is overwritten;
- a corrupt version file and a garbage pointer at start-up: the server starts, serves the last good
  version and lists what it skipped;
- the studies folder read-only (a read-only bind mount): reads and inference work, writes answer 409;
- disk full (a small tmpfs, mounted as root; skipped where mounting is not allowed) while a label is
  saved and while a model version is written: 507, nothing half-written, and it works again once freed.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from server_fixture import (LABELLED, UNLABELLED, http, launch_server, phantom_files, start_server, stop_server,
                            wait_training_idle)

pytestmark = [pytest.mark.server, pytest.mark.slow]

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

FAULT_ENV = "HYBRID_CT_FAULT_AT"
PUBLISH_STEPS = ("publish.start", "publish.saved", "publish.linked", "publish.sidecar", "publish.pointer")
TRAIN = {"max_epochs": 1, "force_promote": True}


# ------------------------------------------------------------------------------ the store check
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def final_labels(studies: Path) -> dict:
    folder = studies / "labels" / "final"
    return {p.name: _sha(p) for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith((".part", ".tmp"))}


def leftovers(workdir: Path) -> list:
    """Temporary files of the app anywhere under the model and studies folders and the server's TMPDIR."""
    out = []
    for root in (workdir / "model", workdir / "studies"):
        out += [str(p.relative_to(workdir)) for p in root.rglob("*")
                if p.is_file() and (p.name.endswith((".tmp", ".part")) or ".publish." in p.name)]
    tmp = workdir / "tmp"
    if tmp.is_dir():
        out += [f"tmp/{p.name}" for p in tmp.iterdir() if p.name.startswith("hybrid_ct_")]
    return sorted(out)


def check_store(workdir: Path, labels: dict | None = None) -> str:
    """The stores are sound; returns the current version."""
    from hybrid_ct.net.checkpoint import load_checkpoint
    from lib.store import ModelStore

    store = ModelStore(workdir / "model")
    current = store.current()
    assert current is not None, "no servable model"
    if store.pointer.is_file():
        named = store.pointer.read_text().strip()
        assert named == current, f"the pointer names {named!r}, which is not servable"
    for v in store.versions():
        load_checkpoint(store.path(v["version"]))  # raises for a corrupt file
        side = json.loads(store.path(v["version"]).with_suffix(".json").read_text()) \
            if store.path(v["version"]).with_suffix(".json").is_file() else {}
        if side.get("sha256"):
            assert _sha(store.path(v["version"])) == side["sha256"], v["version"]
    json.loads((workdir / "studies" / "datastore_v2.json").read_text())  # the index is whole
    if labels is not None:
        assert final_labels(workdir / "studies") == labels, "final labels changed"
    return current


def killed(live, timeout_s: float = 300) -> None:
    """Wait until the server process is gone (killed by the fault point)."""
    live.proc.wait(timeout_s)
    live.canary.close()


@pytest.fixture()
def fault_env(monkeypatch):
    def set_fault(name):
        if name:
            monkeypatch.setenv(FAULT_ENV, name)
        else:
            monkeypatch.delenv(FAULT_ENV, raising=False)
    yield set_fault
    monkeypatch.delenv(FAULT_ENV, raising=False)


def _infer_version(live, image=UNLABELLED[0]) -> str:
    r = http().post(f"{live.url}/infer/hybrid_ct", params={"image": image, "output": "json"},
                    files={"params": (None, "{}")}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


# ------------------------------------------------------------------------------ SIGKILL while publishing
def test_sigkill_at_each_step_of_publishing_a_model(tmp_path, fault_env):
    work = tmp_path / "srv"
    live = start_server(work)
    labels = final_labels(work / "studies")
    stop_server(live)
    seen = {}
    for step in PUBLISH_STEPS:
        fault_env(step)
        live = launch_server(work)  # also the restart after the previous step's kill
        try:
            current = check_store(work, labels)
            assert leftovers(work) == [], (step, leftovers(work))
            assert _infer_version(live) == current
            r = http().post(f"{live.url}/train/hybrid_ct", json=TRAIN, timeout=60)
            assert r.status_code == 200, r.text
            killed(live)
        finally:
            stop_server(live)
        seen[step] = {"left": leftovers(work), "current": check_store(work, labels)}
    fault_env(None)
    live = launch_server(work)
    try:
        current = check_store(work, labels)
        assert leftovers(work) == []
        versions = http().get(f"{live.url}/hybrid_ct/versions", timeout=30).json()
        assert versions["current"] == current and versions["skipped"] == []
        assert _infer_version(live) == current
        # killed before the link: nothing published; after it: the version is kept (and loads)
        assert not seen["publish.start"]["left"] or all(".publish." in p for p in seen["publish.start"]["left"])
        assert seen["publish.start"]["current"] == seen["publish.saved"]["current"] == "shipped"
        assert seen["publish.linked"]["current"] == "shipped", "an unvetted version was served after a kill"
        assert seen["publish.pointer"]["current"] != "shipped"  # the pointer was written before the kill
        assert len([v for v in versions["versions"] if v["version"] != "shipped"]) == 3
        r = http().post(f"{live.url}/train/hybrid_ct", json=TRAIN, timeout=60)  # and it trains again
        assert r.status_code == 200, r.text
        wait_training_idle(live, 600)
        assert check_store(work, labels) == http().get(f"{live.url}/hybrid_ct/versions", timeout=30).json()["current"]
        assert leftovers(work) == []
    finally:
        stop_server(live)


# ------------------------------------------------------------------------------ SIGKILL during uploads
def _slow_body(data: bytes, started: threading.Event):
    for i in range(0, len(data), 4096):
        yield data[i:i + 4096]
        if i == 4096 * 4:
            started.set()
            time.sleep(30)  # the server is killed meanwhile


def test_sigkill_during_uploads(tmp_path, fault_env):
    work = tmp_path / "srv"
    live = start_server(work)
    labels = final_labels(work / "studies")
    images = sorted(p.name for p in (work / "studies").glob("*.nii.gz"))
    img, lab, _, _ = phantom_files(tmp_path / "in", seed=31)
    # 1. while the body streams in (before the app sees the file)
    body = img.read_bytes() * 8  # long enough to be cut
    started = threading.Event()
    fields = b"".join([b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.nii.gz\"\r\n\r\n"])

    def send():
        try:
            http().put(f"{live.url}/datastore/image", params={"image": "killed_upload"},
                       data=_slow_body(fields + body, started),
                       headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=60)
        except Exception:  # noqa: BLE001 - the connection dies with the server
            pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    assert started.wait(60)
    time.sleep(0.5)
    live.proc.kill()
    killed(live)
    stop_server(live)
    # 2.-4. at the worst moments inside the app, one restart each
    cases = [("datastore.part", "image", "killed_image"), ("write:datastore_v2.json", "image", "half_indexed"),
             ("datastore.part", "label", LABELLED[0])]
    for fault, kind, name in cases:
        fault_env(fault)
        live = launch_server(work)
        try:
            check_store(work, labels)
            assert leftovers(work) == [], (fault, leftovers(work))
            if kind == "image":
                req = dict(params={"image": name}, files={"file": ("c.nii.gz", img.read_bytes())})
                url = f"{live.url}/datastore/image"
            else:  # overwrite a final label: the old one must survive the kill whole
                req = dict(params={"image": name, "tag": "final"},
                           files={"label": ("l.nii.gz", (work / "studies" / "labels" / "final" /
                                                         f"{LABELLED[1]}.nii.gz").read_bytes()),
                                  "params": (None, "{}")})
                url = f"{live.url}/datastore/label"
            try:
                http().put(url, timeout=60, **req)
            except Exception:  # noqa: BLE001 - killed mid-request
                pass
            killed(live, 60)
        finally:
            stop_server(live)
        assert final_labels(work / "studies") == labels, f"{fault}: a final label changed"
    fault_env(None)
    live = launch_server(work)
    try:
        check_store(work, labels)
        assert leftovers(work) == []
        ids = set(http().get(f"{live.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"])
        assert "killed_upload" not in ids and "killed_image" not in ids
        now = sorted(p.name for p in (work / "studies").glob("*.nii.gz"))
        # the image whose index write was cut is whole on disk: the restart's reconcile lists it
        assert set(now) - set(images) <= {"half_indexed.nii.gz"}
        if "half_indexed.nii.gz" in now:
            assert _sha(work / "studies" / "half_indexed.nii.gz") == _sha(img)
        r = http().put(f"{live.url}/datastore/image", params={"image": "killed_image"},
                       files={"file": ("c.nii.gz", img.read_bytes())}, timeout=120)
        assert r.status_code == 200, r.text  # the id is free again
    finally:
        stop_server(live)


# ------------------------------------------------------------------------------ corrupt files at start-up
def test_corrupt_version_at_startup_serves_the_last_good_one(tmp_path):
    from hybrid_ct.net.checkpoint import load_checkpoint
    from lib.store import ModelStore

    work = tmp_path / "srv"
    live = start_server(work, conf={"expose": "model_download"})
    stop_server(live)
    store = ModelStore(work / "model")
    model, _ = load_checkpoint(store.shipped)
    v1 = store.publish(model, {"metric": 0.5})
    v2 = store.publish(model, {"metric": 0.6})
    v3 = store.publish(model, {"metric": 0.7})
    assert store.current() == v3
    data = store.path(v3).read_bytes()
    store.path(v3).write_bytes(data[: len(data) // 2])  # a torn write
    flipped = bytearray(store.path(v2).read_bytes())
    flipped[len(flipped) // 2] ^= 0x01  # one bit: the file still loads, its hash does not match
    store.path(v2).write_bytes(bytes(flipped))
    live = launch_server(work)
    try:
        versions = http().get(f"{live.url}/hybrid_ct/versions", timeout=30).json()
        assert versions["current"] == v1, versions
        assert {s["version"] for s in versions["skipped"]} == {v2, v3}
        assert "sha256" in next(s["reason"] for s in versions["skipped"] if s["version"] == v2)
        assert [v["version"] for v in versions["versions"]] == ["shipped", v1]
        info = http().get(f"{live.url}/info/", timeout=30).json()["hybrid_ct"]
        assert info["current"] == v1 and len(info["skipped"]) == 2
        assert _infer_version(live) == v1
        log = live.log_path.read_text()
        assert f"model version {v3} skipped" in log and f"model version {v2} skipped" in log
        assert (store.quarantine_dir / f"{v3}.pt").is_file()  # set aside, never deleted
        r = http().get(f"{live.url}/model/info/no_such_model", timeout=30)
        assert r.status_code == 404, r.text  # the optional info route: unknown model 404
    finally:
        stop_server(live)
    v4 = store.publish(model, {"metric": 0.8})
    assert v4 == "v0004", "a skipped version's number was reused"
    store.pointer.write_text("v00x1 garbage\n")  # a garbage pointer
    live = launch_server(work)
    try:
        assert http().get(f"{live.url}/hybrid_ct/versions", timeout=30).json()["current"] == v4
        assert store.pointer.read_text().strip() == v4
        assert check_store(work) == v4
    finally:
        stop_server(live)


# ------------------------------------------------------------------------------ mounts (root only)
def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture()
def can_mount(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)):
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs): the disk-full and read-only tests are skipped")
    _umount(probe)


def test_studies_folder_read_only(tmp_path, can_mount):
    work = tmp_path / "srv"
    live = start_server(work)
    stop_server(live)
    studies = work / "studies"
    labels = final_labels(studies)
    assert _mount("--bind", str(studies), str(studies)) and _mount("-o", "remount,bind,ro", str(studies))
    try:
        live = launch_server(work)
        try:
            s = http()
            assert s.get(f"{live.url}/datastore/", params={"output": "all"}, timeout=30).status_code == 200
            assert _infer_version(live)
            img, lab, _, _ = phantom_files(tmp_path / "in", seed=41)
            writes = [
                s.put(f"{live.url}/datastore/image", params={"image": "ro_case"},
                      files={"file": ("c.nii.gz", img.read_bytes())}, timeout=120),
                s.put(f"{live.url}/datastore/label", params={"image": LABELLED[0], "tag": "final"},
                      files={"label": ("l.nii.gz", (studies / "labels" / "final" / f"{LABELLED[0]}.nii.gz")
                                       .read_bytes()), "params": (None, "{}")}, timeout=120),
                s.put(f"{live.url}/datastore/image/info", params={"image": LABELLED[0]},
                      data={"info": json.dumps({"diagnosis": "negative"})}, timeout=60),
            ]
            for r in writes:
                assert r.status_code == 409 and "read-only" in r.json()["detail"], (r.status_code, r.text)
            assert live.alive()
        finally:
            stop_server(live)
    finally:
        _umount(studies)
    assert final_labels(studies) == labels and leftovers(work) == []


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` until about ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_disk_full_while_saving_a_label_and_writing_a_model_version(tmp_path, can_mount):
    work = tmp_path / "srv"
    studies, model_dir = work / "studies", work / "model"
    for d in (studies, model_dir):
        d.mkdir(parents=True)
        assert _mount("-t", "tmpfs", "-o", "size=24m", "tmpfs", str(d))
    live = None
    try:
        live = start_server(work)
        labels = final_labels(studies)
        ckpt = (model_dir / "pretrained.pt").stat().st_size
        s = http()
        # a label: the final label of LABELLED[0] replaced by LABELLED[1]'s map (same grid), disk full
        new_label = (studies / "labels" / "final" / f"{LABELLED[1]}.nii.gz").read_bytes()
        filler = _fill(studies, 0)
        r = s.put(f"{live.url}/datastore/label", params={"image": LABELLED[0], "tag": "final"},
                  files={"label": ("l.nii.gz", new_label), "params": (None, "{}")}, timeout=120)
        assert r.status_code == 507 and "disk is full" in r.json()["detail"], (r.status_code, r.text)
        assert final_labels(studies) == labels and leftovers(work) == []
        check_store(work, labels)
        filler.unlink()
        r = s.put(f"{live.url}/datastore/label", params={"image": LABELLED[0], "tag": "final"},
                  files={"label": ("l.nii.gz", new_label), "params": (None, "{}")}, timeout=120)
        assert r.status_code == 200, r.text
        labels = final_labels(studies)
        # a model version: room for the training's small files, not for the checkpoint
        before = check_store(work, labels)
        filler = _fill(model_dir, ckpt // 3)
        assert s.post(f"{live.url}/train/hybrid_ct", json=TRAIN, timeout=60).status_code == 200
        wait_training_idle(live, 600)
        assert check_store(work, labels) == before and leftovers(work) == []
        assert [v["version"] for v in s.get(f"{live.url}/hybrid_ct/versions", timeout=30).json()["versions"]] \
            == ["shipped"]
        assert _infer_version(live) == before
        assert "No space left on device" in live.log_path.read_text() + (work / "server.stdout").read_text()
        filler.unlink()
        assert s.post(f"{live.url}/train/hybrid_ct", json=TRAIN, timeout=60).status_code == 200
        wait_training_idle(live, 600)
        after = check_store(work, labels)
        assert after != before and leftovers(work) == [] and _infer_version(live) == after
    finally:
        if live is not None:
            stop_server(live)
        for d in (studies, model_dir):
            _umount(d)
