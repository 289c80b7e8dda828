"""The server's processes and model over time: it refuses to start rather than serve unguarded routes;
20 parallel inferences across a model publish; a training started elsewhere blocks a second one;
``kill -9`` during training leaves no orphan and a restarted server trains again; SIGTERM stops the
training with the server. Each test runs its own real server (they kill it)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from server_fixture import (UNLABELLED, http, launch_server, start_server, stop_server, studies_digest,
                            wait_training_idle, wait_until)

pytestmark = [pytest.mark.server, pytest.mark.slow]

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct"
LONG_TRAIN = {"max_epochs": 5000, "train_batch_size": 4}


def _store(model_dir):
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.store import ModelStore

    return ModelStore(model_dir)


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _training_pid(live) -> int:
    """PID of the training subprocess once it holds the training lock."""
    lock = live.model_dir / "train.lock"
    info = wait_until(lambda: lock.is_file() and json.loads(lock.read_text() or "{}"), "the training lock", 180)
    return int(info["pid"])


def _model_files(model_dir: Path) -> dict:
    keep = {"pretrained.pt", "current"}
    return {k: v for k, v in studies_digest(model_dir).items() if k in keep or k.startswith("versions/")}


def _label_files(studies: Path) -> dict:
    return {k: v for k, v in studies_digest(studies).items() if k.endswith((".nii.gz", ".nrrd", ".nii"))}


@pytest.fixture()
def live(tmp_path):
    server = start_server(tmp_path / "srv")
    yield server
    stop_server(server)


@pytest.mark.parametrize("expose", ["session", "no_such_group"])
def test_server_refuses_to_start_rather_than_open_routes(tmp_path, expose):
    with pytest.raises(RuntimeError, match="exited with code"):
        start_server(tmp_path / "srv", conf={"expose": expose}, model=False)
    log = (tmp_path / "srv" / "server.log").read_text()
    assert "expose" in log and "Application startup failed" in log


def test_twenty_parallel_inferences_across_a_publish(live):
    from hybrid_ct.net.checkpoint import load_checkpoint

    model, meta = load_checkpoint(live.model_dir / "pretrained.pt")
    results, errors, published = [], [], {}
    first_done = threading.Event()

    def infer(i):
        try:
            r = http().post(f"{live.url}/infer/hybrid_ct", params={"image": UNLABELLED[i % 3], "output": "json"},
                            files={"params": (None, "{}")}, timeout=300)
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
            else:
                results.append(r.json())
        except Exception as e:  # noqa: BLE001 - every failure is counted
            errors.append(repr(e))
        first_done.set()

    def publish():
        first_done.wait(300)
        version = _store(live.model_dir).publish(model, {"metric": 0.5, "note": "published mid-flight"})
        published.update(version=version, at=time.time())

    threads = [threading.Thread(target=infer, args=(i,)) for i in range(20)] + [threading.Thread(target=publish)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert errors == [] and len(results) == 20
    new = published["version"]
    after = [r for r in results if r["started_ts"] > published["at"]]
    assert after, "no request started after the publish: the test did not exercise a swap"
    assert {r["model_version"] for r in after} == {new}
    assert {r["model_version"] for r in results} <= {"shipped", new}


def test_a_live_training_elsewhere_blocks_a_second_one(live):
    """A training process the server did not start (as after a restart beside an orphan) holds the lock."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        p = psutil.Process(holder.pid)
        (live.model_dir / "train.lock").write_text(json.dumps({"pid": holder.pid, "create_time": p.create_time(),
                                                               "started": "earlier"}))
        r = http().post(f"{live.url}/train/hybrid_ct", json={"max_epochs": 1}, timeout=60)
        assert r.status_code == 409 and str(holder.pid) in r.json()["detail"], r.text
    finally:
        holder.kill()
        holder.wait()
    r = http().post(f"{live.url}/train/hybrid_ct", json={"max_epochs": 1}, timeout=60)  # stale lock: removed
    assert r.status_code == 200, r.text
    wait_training_idle(live, 600)
    assert not (live.model_dir / "train.lock").exists()


def test_kill9_during_training_leaves_no_orphan_and_a_restart_trains_again(live):
    labels, models = _label_files(live.studies), _model_files(live.model_dir)
    assert http().post(f"{live.url}/train/hybrid_ct", json=LONG_TRAIN, timeout=60).status_code == 200
    trainer = _training_pid(live)
    tree = [c.pid for c in psutil.Process(live.proc.pid).children(recursive=True)]
    assert trainer in tree
    os.kill(live.proc.pid, signal.SIGKILL)
    live.proc.wait(30)
    wait_until(lambda: all(_dead(pid) for pid in tree), "the server's children to die with it", 30)

    assert _label_files(live.studies) == labels, "labels changed"
    assert _model_files(live.model_dir) == models, "the model store changed"
    restarted = launch_server(live.workdir, live.conf)
    try:
        r = http().post(f"{restarted.url}/train/hybrid_ct", json={"max_epochs": 1}, timeout=60)
        assert r.status_code == 200, r.text  # the stale lock of the killed training does not block
        wait_training_idle(restarted, 600)
        stats = http().get(f"{restarted.url}/info/", timeout=30).json()["train_stats"]["hybrid_ct"]
        assert stats["status"] == "DONE" and stats["published_version"], stats
        assert _label_files(restarted.studies) == labels
    finally:
        stop_server(restarted)


def test_sigterm_stops_the_training_with_the_server(live):
    assert http().post(f"{live.url}/train/hybrid_ct", json=LONG_TRAIN, timeout=60).status_code == 200
    trainer = _training_pid(live)
    live.proc.send_signal(signal.SIGTERM)
    live.proc.wait(60)  # stock: the interpreter waited for the training to end
    wait_until(lambda: _dead(trainer), "the training to stop with the server", 30)
