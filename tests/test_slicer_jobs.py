"""Issue 17, Qt-free: jobs off the GUI thread (progress, cancel, scene drop), polling that survives
timeouts, transfers at full speed, temp files removed on every path, upload consent, the volume in view."""

from __future__ import annotations

import http.server
import os
import threading
import time

import numpy as np
import pytest

from hybrid_ct_slicer.client import HybridCTClient, ServerError
from hybrid_ct_slicer.identity import resolve_identity
from hybrid_ct_slicer.jobs import JobRunner, Poller
from hybrid_ct_slicer.mockserver import MockServer
from hybrid_ct_slicer.policy import choose_volume, is_local_host, remember_approval, upload_consent
from hybrid_ct_slicer.testdata import make_chest_volume
from hybrid_ct_slicer.workflow import Workflow

DOWNLOAD_MB = 60


def _drive(runner: JobRunner, until, timeout=60.0):
    """What the module's QTimer does: deliver on this ('GUI') thread until ``until()``."""
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, "job did not finish"
        runner.deliver()
        time.sleep(0.005)
    runner.deliver()


# ------------------------------------------------------------------------------ job runner
def test_job_runs_off_the_calling_thread_with_progress():
    runner, seen, out = JobRunner(), [], {}
    gui = threading.get_ident()

    def work(job):
        job.progress(40, "half")
        time.sleep(0.1)
        return threading.get_ident()

    runner.start("w", work, on_done=lambda r: out.setdefault("thread", r), on_progress=lambda p, m: seen.append((p, m)))
    assert runner.busy and runner.start("second", work) is None  # one exclusive job at a time
    _drive(runner, lambda: "thread" in out)
    assert out["thread"] != gui and (40, "half") in seen and not runner.busy


def test_cancel_frees_the_gui_at_once_and_discards_the_result():
    runner, out, discarded = JobRunner(), {}, []
    started = threading.Event()

    def work(job):
        started.set()
        while not job.cancelled:
            time.sleep(0.01)
        return "late result"

    job = runner.start("slow", work, on_done=lambda r: out.setdefault("done", r), on_discard=discarded.append)
    started.wait(5)
    assert runner.cancel() and not runner.busy  # the buttons are usable again immediately
    _drive(runner, lambda: job.finished and not runner.running)
    assert out == {} and discarded == ["late result"]


def test_scene_close_drops_the_jobs_of_that_scene():
    runner, out = JobRunner(), []
    release = threading.Event()
    runner.start("old scene", lambda job: (release.wait(5), "old")[1], tag=0, on_done=out.append)
    runner.start("poll", lambda job: (release.wait(5), "other")[1], tag=1, exclusive=False, on_done=out.append)
    assert runner.drop_tag(0) == 1 and not runner.busy
    release.set()
    _drive(runner, lambda: not runner.running)
    assert out == ["other"]


class _FlakyStatus(http.server.BaseHTTPRequestHandler):
    calls = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).calls += 1
        if type(self).calls == 1:
            time.sleep(1.0)  # longer than the client's timeout: the first poll times out
        body = b'{"status": "RUNNING"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_polling_survives_a_timeout():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyStatus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = HybridCTClient(f"http://127.0.0.1:{server.server_address[1]}", timeout=0.3)
        runner, results, errors = JobRunner(), [], []
        poller = Poller(runner, "status", lambda job: client.train_status(), 0.05,
                        on_result=results.append, on_error=errors.append)
        poller.start()
        end = time.monotonic() + 20
        while len(results) < 2 and time.monotonic() < end:
            poller.tick()
            runner.deliver()
            time.sleep(0.01)
        assert errors and isinstance(errors[0], ServerError) and errors[0].kind == "timeout"
        assert len(results) >= 2 and results[0] == {"status": "RUNNING"}, "polling stopped after the timeout"
        assert poller.failures == 0
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ transfers
def test_60mb_download_at_full_speed(tmp_path):
    """Next sample's download through the module's own path (Workflow.fetch_image in a Job, delivered by
    the 'GUI' loop) from a local HTTP server on 127.0.0.1. The speed is printed (docs/slicer.md)."""
    payload = os.urandom(DOWNLOAD_MB * 1_000_000)
    with MockServer() as server:
        server.images["big"] = (payload, "big.nii.gz")
        workflow_dir = tmp_path / "work"
        runner, out, progress = JobRunner(), {}, []

        def work(job):
            wf = Workflow(HybridCTClient(server.url), work_dir=str(workflow_dir), progress=job.progress,
                          cancelled=lambda: job.cancelled)
            return wf.fetch_image("big")

        t0 = time.perf_counter()
        runner.start("download", work, on_done=lambda p: out.setdefault("path", p),
                     on_progress=lambda p, m: progress.append(p))
        _drive(runner, lambda: "path" in out)
        seconds = time.perf_counter() - t0
    speed = DOWNLOAD_MB / seconds
    print(f"\n60 MB download through Workflow.fetch_image in a Job: {seconds:.3f} s = {speed:.0f} MB/s")
    with open(out["path"], "rb") as f:
        assert f.read() == payload
    os.remove(out["path"])
    assert speed > 30, f"download too slow: {speed:.1f} MB/s"


def test_cancelled_download_leaves_no_file(tmp_path):
    with MockServer() as server:
        server.images["big"] = (b"\0" * 20_000_000, "big.nii.gz")
        wf = Workflow(HybridCTClient(server.url), work_dir=str(tmp_path), cancelled=lambda: True)
        with pytest.raises(ServerError, match="cancelled"):
            wf.fetch_image("big")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ privacy
@pytest.fixture(scope="module")
def volume():
    array, _label, geometry = make_chest_volume(shape=(8, 32, 32))
    return array, geometry, resolve_identity(array, geometry)


def test_temp_folder_empty_after_success_and_after_a_failed_upload(tmp_path, volume):
    array, geometry, identity = volume
    with MockServer() as server:
        wf = Workflow(HybridCTClient(server.url), work_dir=str(tmp_path))
        result = wf.run_volume(identity, array, geometry, model="hybrid_ct")
        assert result.uploaded and os.listdir(tmp_path) == [os.path.basename(result.label_path)]
        os.remove(result.label_path)  # the module loads it, then removes it (ModuleLogic.showResult)
        again = wf.run_volume(identity, array, geometry, model="hybrid_ct")
        assert again.uploaded is False and server.uploads == 1  # the server holds this exact file
        os.remove(again.label_path)
        assert os.listdir(tmp_path) == []
    with MockServer(fail_uploads=True) as server:
        wf = Workflow(HybridCTClient(server.url), work_dir=str(tmp_path))
        with pytest.raises(ServerError, match="upload refused"):
            wf.run_volume(identity, array, geometry, model="hybrid_ct")
        with pytest.raises(ServerError):
            wf.submit_volume_correction(identity, array, geometry, np.zeros(array.shape, np.uint8), geometry)
    assert os.listdir(tmp_path) == [], "a patient image was left behind"


def test_upload_with_progress_and_cancel(tmp_path, volume):
    array, geometry, identity = volume
    with MockServer() as server:
        seen = []
        client = HybridCTClient(server.url)
        client.upload_image(b"x" * 3_000_000, "img", filename="img.nii.gz", progress=lambda p, m: seen.append(p))
        assert seen[-1] == 100 and server.images["img"][0] == b"x" * 3_000_000
        with pytest.raises(ServerError, match="cancelled"):
            client.upload_image(b"y" * 100, "img2", filename="img2.nii.gz", cancelled=lambda: True)
        assert "img2" not in server.images


@pytest.mark.parametrize("host,local", [("localhost", True), ("127.0.0.1", True), ("127.4.5.6", True),
                                        ("[::1]", True), ("10.0.0.5", False), ("pacs.example.org", False),
                                        ("localhost.evil.org", False)])
def test_local_hosts(host, local):
    assert is_local_host(host) is local


def test_upload_consent_once_per_server_and_http_warning():
    assert upload_consent("http://127.0.0.1:8000", []).ask is False
    remote = upload_consent("http://10.0.0.5:8000/", [])
    assert remote.ask and "plain http" in remote.warning and "10.0.0.5" in remote.question
    approved = remember_approval([], remote.server)
    again = upload_consent("10.0.0.5:8000", approved)
    assert again.ask is False and again.warning  # asked once; the http warning stays
    secure = upload_consent("https://ai.hospital.org", approved)
    assert secure.ask and secure.warning == ""


# ------------------------------------------------------------------------------ volume in view
def test_volume_in_view_wins_unless_the_user_picked_another():
    ids = ["vtkMRMLScalarVolumeNode1", "vtkMRMLScalarVolumeNode2"]
    first, second = ids
    # the second study loaded and shown in the red view: Run targets it, not the first one loaded
    assert choose_volume(second, None, ids).volume_id == second
    assert choose_volume(second, None, ids).followed_view
    picked = choose_volume(second, first, ids)
    assert picked.volume_id == first and not picked.followed_view and "not the one in the red view" in picked.reason
    assert choose_volume(second, "gone", ids).volume_id == second  # a removed pick falls back to the view
    assert choose_volume(None, first, ids).volume_id == first
    assert choose_volume(None, None, ids).volume_id is None
