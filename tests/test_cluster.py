"""Batch prediction on a Dask cluster and resumable batches (issue 31): ``hybrid-ct predict --workers N`` /
``--cluster ADDRESS`` write the same files as one process; a worker killed by PID mid-case, a case that fails
twice, the scheduler killed mid-run and the rerun that goes on from the manifest.

Six small phantom studies (16 x 96 x 96) through the shipped model (real masks, so "the same files" means
something), one torch thread per process; about 2 minutes on an idle 2-core machine."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hybrid_ct.cli import main

pytestmark = pytest.mark.slow

N_STUDIES = 6
SHAPE = (16, 96, 96)
VOLATILE = ("latency_s",)  # timings: the only values allowed to differ between two runs


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    from hybrid_ct.data.phantom import write_phantom_set

    folder = tmp_path_factory.mktemp("studies")
    write_phantom_set(folder, n=N_STUDIES, seed=5, shape=SHAPE, with_labels=False)
    return folder


@pytest.fixture(scope="module")
def shipped_model() -> Path:
    from hybrid_ct.net.model_files import default_model_path

    return Path(default_model_path())


@pytest.fixture(scope="module")
def reference(studies, shipped_model, tmp_path_factory) -> Path:
    """The one-process run: what every cluster run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert _predict(shipped_model, out, studies) == 0
    return out


def _predict(model, out, *inputs, extra=()) -> int:
    return main(["-q", "--threads", "1", "predict", *map(str, inputs), "--model", str(model), "--out", str(out),
                 *extra])


def _summary(out: Path) -> dict:
    with open(out / "summary.csv", newline="") as f:
        return {r["case"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(f)}


def _manifest(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {r["case"]: r for r in recs}


def assert_same_outputs(ref: Path, out: Path) -> None:
    """Every file of the reference run byte-identical in ``out`` (JSON and summary.csv: but the timings), and
    the manifest recording the same input, model, status and output sha256 per case."""
    names = sorted(p.name for p in ref.iterdir() if p.name not in ("manifest.jsonl", "summary.csv"))
    assert len(names) == 3 * N_STUDIES  # label, overlay, JSON per study
    for name in names:
        a, b = ref / name, out / name
        assert b.is_file(), f"{name} missing"
        if name.endswith(".json"):
            ja, jb = (json.loads(p.read_text()) for p in (a, b))
            for key in VOLATILE:
                ja.pop(key), jb.pop(key)
            assert ja == jb, name
        else:
            assert a.read_bytes() == b.read_bytes(), f"{name} differs"
    sa, sb = _summary(ref), _summary(out)
    assert {c: sb[c] for c in sa} == sa
    ma, mb = _manifest(ref), _manifest(out)
    for case, rec in ma.items():
        for key in ("fingerprint", "model_sha256", "settings", "status"):
            assert mb[case][key] == rec[key], (case, key)
        same = {n: v[2] for n, v in rec["outputs"].items() if not n.endswith(".json")}  # JSON: timings differ
        assert {n: v[2] for n, v in mb[case]["outputs"].items() if not n.endswith(".json")} == same
        assert sorted(mb[case]["outputs"]) == sorted(rec["outputs"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_thread(fn, *args, **kw):
    box = {}

    def target():
        box["rc"] = fn(*args, **kw)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _wait(cond, timeout: float, what: str, step: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------------------------------

def test_two_local_workers_write_the_same_files_as_one_process(reference, studies, shipped_model, tmp_path):
    out = tmp_path / "w2"
    assert _predict(shipped_model, out, studies, extra=("--workers", "2")) == 0
    assert_same_outputs(reference, out)
    assert {r["status"] for r in _manifest(out).values()} == {"ok"}


def test_a_worker_killed_mid_case_is_retried_and_a_case_failing_twice_is_an_error(reference, studies,
                                                                                     shipped_model, tmp_path):
    """An existing cluster (``--cluster``): one worker killed by PID while it runs a case -> the case runs
    again on a fresh worker and the run completes; a case that raises on every try -> tried twice, an "error"
    row with its reason, exit status 1, every other case done."""
    from distributed import Client, LocalCluster

    from hybrid_ct.predict.batch import expand_inputs

    bad = tmp_path / "broken.npy"  # an object array: np.load raises ValueError, not a refusal
    np.save(bad, np.array([{"not": "an image"}], dtype=object), allow_pickle=True)
    names = [c.name for c in expand_inputs([str(studies), str(bad)])[0]]
    out = tmp_path / "killed"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      env={"OMP_NUM_THREADS": "1"}) as cluster, Client(cluster, set_as_default=False) as client:
        t, box = _in_thread(_predict, shipped_model, out, studies, bad, extra=("--cluster", cluster.scheduler_address))

        def running_case():  # (worker address, task key) of a study being predicted right now, not yet written
            for addr, tasks in client.call_stack().items():
                for key in tasks:
                    case = names[int(str(key).rsplit("-", 1)[1])]
                    if str(key).startswith("hybrid-ct-") and case != "broken" and not (out / f"{case}.json").exists():
                        return addr, key, case
            return None

        addr, key, case = _wait(running_case, 300, "a worker running a case")
        pid = client.run(os.getpid, workers=[addr])[addr]
        os.kill(pid, signal.SIGKILL)
        t.join(600)
        assert not t.is_alive()
        story = cluster.scheduler.story(key)
        bad_key = f"{str(key).rsplit('-', 1)[0]}-{names.index('broken')}"
        bad_story = cluster.scheduler.story(bad_key)
    assert box["rc"] == 1  # one case failed; every other ran
    assert sum(1 for s in story if s[2] == "processing") >= 2, f"{case} was not run again after the kill"
    assert sum(1 for s in bad_story if s[2] == "processing") == 2, "the broken case should be tried twice"
    assert_same_outputs(reference, out)
    rows = _summary(out)
    assert rows["broken"]["status"] == "error"
    assert rows["broken"]["error"].startswith("ValueError: ") and "object" in rows["broken"]["error"].lower(), \
        rows["broken"]  # numpy's reason, as the one-process path reports it
    assert _manifest(out)["broken"]["status"] == "error"


def test_scheduler_gone_is_a_clear_error_and_the_rerun_goes_on_from_the_manifest(reference, studies, shipped_model,
                                                                                   tmp_path, capsys):
    """A running scheduler (``dask scheduler`` + ``dask worker``, processes of their own) killed by PID after two
    cases: exit status 2 and a message saying what to do; then one half-written label and a torn manifest line;
    the same command without a cluster (the manifest is everybody's) runs only what is missing or corrupt, and
    the outputs are those of the one-process run."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--dashboard-address", ":0"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1",
                               "--nthreads", "1", "--no-dashboard", "--death-timeout", "300"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "gone"
    try:
        t, box = _in_thread(_predict, shipped_model, out, studies, extra=("--cluster", address))
        manifest = out / "manifest.jsonl"
        _wait(lambda: manifest.is_file() and len(manifest.read_text().splitlines()) >= 2, 300, "two finished cases")
        os.kill(scheduler.pid, signal.SIGKILL)
        t.join(300)
        assert not t.is_alive()
    finally:
        for proc in (scheduler, worker):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    err = capsys.readouterr().err
    assert box["rc"] == 2
    assert "lost the Dask scheduler" in err and "run the same command again" in err, err
    assert not (out / "summary.csv").exists()  # the batch did not finish: no summary pretending it did
    done = sorted(_manifest(out))
    assert 2 <= len(done) < N_STUDIES
    corrupt, kept = done[0], done[1:]
    label = out / f"{corrupt}_label.nii.gz"
    label.write_bytes(label.read_bytes()[: label.stat().st_size // 2])  # a crash while writing it
    with open(manifest, "a") as f:
        f.write('{"case": "phantom_00')  # a crash while appending
    before = {c: (out / f"{c}_label.nii.gz").stat().st_mtime_ns for c in kept}
    assert _predict(shipped_model, out, studies) == 0
    assert {c: (out / f"{c}_label.nii.gz").stat().st_mtime_ns for c in kept} == before  # not run again
    assert_same_outputs(reference, out)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == N_STUDIES  # compacted: one line per case


def test_the_manifest_redoes_other_model_other_settings_and_changed_inputs(studies, model_path, tmp_path):
    """One process, the tiny untrained model (fast): done cases are skipped, and run again when the model, a
    setting or an input file changes, or with --no-resume."""
    import torch

    from hybrid_ct.net.checkpoint import save_checkpoint
    from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig

    inputs = sorted(studies.glob("*.nii.gz"))[:2]
    out = tmp_path / "out"

    def mtimes():
        return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.json"))}

    assert _predict(model_path, out, *inputs) == 0
    first = mtimes()
    assert len(first) == 2
    assert _predict(model_path, out, *inputs) == 0
    assert mtimes() == first  # done and valid: not run again
    assert _predict(model_path, out, *inputs, extra=("--no-resume",)) == 0
    second = mtimes()
    assert all(second[n] != first[n] for n in first)

    torch.manual_seed(1)
    cfg = NetConfig(levels=3, base_channels=4, max_channels=16, time_steps=2, fc_hidden=16, cls_pool=2, in_size=64)
    other = save_checkpoint(tmp_path / "other.pt", HybridMultiTaskNet(cfg), {"version": "tiny-other"})
    assert _predict(other, out, *inputs) == 0
    third = mtimes()
    assert all(third[n] != second[n] for n in second)  # another model: all again
    assert {r["model_sha256"] for r in _manifest(out).values()} == {__import__("hashlib").sha256(
        other.read_bytes()).hexdigest()}

    assert _predict(other, out, *inputs, extra=("--overlays", "0")) == 0
    fourth = mtimes()
    assert all(fourth[n] != third[n] for n in third)  # other settings: all again

    touched = tmp_path / "copy.nii.gz"
    touched.write_bytes(inputs[0].read_bytes())
    assert _predict(other, out, touched, inputs[1], extra=("--overlays", "0")) == 0
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10 ** 9))
    fifth = mtimes()
    assert _predict(other, out, touched, inputs[1], extra=("--overlays", "0")) == 0
    sixth = mtimes()
    assert sixth["copy.json"] != fifth["copy.json"]  # the input changed: run again
    assert sixth[f"{inputs[1].name[:-7]}.json"] == fifth[f"{inputs[1].name[:-7]}.json"]


def test_a_worker_refuses_a_model_file_that_is_not_the_clients(model_path, tmp_path):
    """The plugin checks the checkpoint's sha256 on every worker before loading it (a node whose shared storage
    holds another file at the same path); the client re-raises it (``Client.register_plugin``) -> exit 2."""
    from hybrid_ct.errors import ModelNotReadyError
    from hybrid_ct.predict.cluster import PredictorPlugin
    from hybrid_ct.predict.manifest import file_sha256

    class FakeWorker:
        address = "tcp://node-7:40000"

    kw = {"device": "cpu", "batch_size": 8, "require_chest": True, "amp": False}
    plugin = PredictorPlugin(str(model_path), file_sha256(model_path), kw, threads=1)
    plugin.setup(FakeWorker())
    assert plugin.predictor is not None and plugin.predictor.version == "tiny-test"
    with pytest.raises(ModelNotReadyError, match="not the same model"):
        PredictorPlugin(str(model_path), "0" * 64, kw).setup(FakeWorker())
    with pytest.raises(ModelNotReadyError, match="no model file"):
        PredictorPlugin(str(tmp_path / "absent.pt"), "0" * 64, kw).setup(FakeWorker())


def test_cluster_options_are_checked_before_anything_starts(studies, model_path, tmp_path, capsys):
    assert _predict(model_path, tmp_path / "a", studies, extra=("--workers", "2", "--cluster", "tcp://x:8786")) == 2
    assert _predict(model_path, tmp_path / "b", studies, extra=("--workers", "0")) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
