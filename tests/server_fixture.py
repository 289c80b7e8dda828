"""The real Hybrid CT MONAI Label server for tests: one per test session, on 127.0.0.1, a free port.

Use it from any test module::

    from server_fixture import server  # noqa: F401  (the pytest fixture)

    def test_something(server):
        requests.get(server.url + "/info/")

(or list ``"server_fixture"`` in ``pytest_plugins`` of ``conftest.py``). The fixture yields a
:class:`LiveServer` (``url``, ``studies``, ``model_dir``, ``log_path``; ``str(server)`` is the URL).
However many modules import the fixture, a single server process runs for the session.

What it starts, exactly as a user would (``python -m monailabel.main start_server --app apps/hybrid_ct
--studies <tmp> --conf models hybrid_ct ...``; the app's code is copied to the temp folder first,
because MONAI Label creates model/, logs/ and bin/ in the app folder), with everything it writes kept
in a temp folder:
studies (6 chest phantoms 8x64x64, final labels for 3), the model folder (``--conf model_dir``) holding
a tiny network really trained for a few epochs on other phantoms (``pretrained.pt``, the "shipped"
model), MONAI Label sessions (``MONAI_LABEL_SESSION_PATH``) and logs (``--log_config``). Automatic
scoring is off (tests start scoring themselves); retraining starts after 3 new labels.

Egress canary: the server's HTTP(S)_PROXY points at a local socket that records every connection, so
any download attempt (SAM2 weights, model zoo, dcmqi) made through requests/urllib is seen:
``server.egress`` lists them. On a failed session the tail of the server log is printed.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "hybrid_ct"
PHANTOM_SHAPE = (8, 64, 64)
TINY_NET = dict(levels=3, base_channels=4, fc_hidden=16, time_steps=2, in_size=64)
STARTUP_TIMEOUT_S = 240
LABELLED = ("phantom_000", "phantom_001", "phantom_002")
UNLABELLED = ("phantom_003", "phantom_004", "phantom_005")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EgressCanary:
    """A TCP listener standing in for an HTTP proxy: records (and refuses) every connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits: list = []
        self._stop = False
        threading.Thread(target=self._serve, name="egress-canary", daemon=True).start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(2)
                self.hits.append(conn.recv(512).decode("latin-1").split("\r\n")[0])
            except OSError:
                self.hits.append("(connection without request line)")
            finally:
                conn.close()

    def close(self):
        self._stop = True
        self.sock.close()


@dataclass
class LiveServer:
    url: str
    studies: Path
    model_dir: Path
    log_path: Path
    proc: subprocess.Popen
    canary: EgressCanary
    workdir: Path
    conf: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.url

    @property
    def egress(self) -> list:
        return list(self.canary.hits)

    def log_tail(self, n: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def tmp(self) -> Path:
        """The server's TMPDIR."""
        return self.workdir / "tmp"


def write_studies(studies: Path) -> None:
    """6 phantoms (alternating positive / negative), final labels for the first 3."""
    from hybrid_ct.data.phantom import write_phantom_set

    write_phantom_set(studies, n=6, seed=7, shape=PHANTOM_SHAPE)
    for name in UNLABELLED:
        (studies / "labels" / "final" / f"{name}.nii.gz").unlink()


def train_tiny_model(path: Path, epochs: int = 3) -> dict:
    """A tiny network trained for a few epochs on phantoms with the core API (a real, weak model)."""
    import torch

    from hybrid_ct.net.checkpoint import save_checkpoint
    from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
    from hybrid_ct.data.phantom import make_phantom
    from hybrid_ct.data.slice_store import SliceSet, slices_from_volume
    from hybrid_ct.train.config import TrainConfig
    from hybrid_ct.train.trainer import fit

    torch.manual_seed(0)
    data = SliceSet.empty(TINY_NET["in_size"])
    for i in range(4):
        img, lab, _ = make_phantom(1000 + i, shape=PHANTOM_SHAPE, positive=i % 2 == 0)
        data = data.extend(slices_from_volume(img, lab, f"train{i}", size=TINY_NET["in_size"]))
    model = HybridMultiTaskNet(NetConfig(**TINY_NET))
    hist = fit(model, data, data, TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, negative_fraction=1.0,
                                              augment=False), progress=False)
    meta = {"version": "tiny-test-model", "metric": hist[-1]["val"]["score"], "epochs": epochs}
    save_checkpoint(path, model, meta)
    return meta


def _log_config(path: Path, log_file: Path) -> Path:
    cfg = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"f": {"format": "[%(asctime)s] [%(process)d] [%(levelname)s] (%(name)s) - %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "formatter": "f", "filename": str(log_file)}},
        "root": {"level": "INFO", "handlers": ["file"]},
    }
    path.write_text(json.dumps(cfg))
    return path


def start_server(workdir: Path, conf: dict | None = None, model=True, studies_writer=None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S, studies_url: str | None = None) -> LiveServer:
    """Start the server in ``workdir`` (studies/, model/, sessions/, server.log) and wait for /info/.

    ``model``: True -> a tiny network trained here; a path -> that checkpoint is the shipped model;
    False -> no model at all. ``studies_writer(path)`` fills the studies folder (default: 6 phantoms).
    ``studies_url``: serve this DICOMweb URL (a PACS) as ``--studies`` instead of the studies folder.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    studies, model_dir = workdir / "studies", workdir / "model"
    (studies_writer or write_studies)(studies)
    model_dir.mkdir(exist_ok=True)
    if model is True:
        train_tiny_model(model_dir / "pretrained.pt")
    elif model:
        shutil.copyfile(model, model_dir / "pretrained.pt")
    else:  # no model at all: not even the one shipped inside the hybrid_ct package
        conf = {"shipped_model": "none", **(conf or {})}
    return launch_server(workdir, conf, startup_timeout_s, studies_url)


def launch_server(workdir: Path, conf: dict | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                  studies_url: str | None = None) -> LiveServer:
    """Start the server on ``workdir``'s existing studies and model folder (a first start or a restart)."""
    import requests

    studies, model_dir = workdir / "studies", workdir / "model"
    # MONAI Label creates model/, logs/ and bin/ inside the app folder it serves: run a copy of the
    # app's code (main.py + lib/) so that a test run never writes into the repository
    app_dir = workdir / "app" / "hybrid_ct"
    if not app_dir.exists():
        shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "model", "logs",
                                                                        "bin", "*.log"))
    port = free_port()
    log_path = workdir / "server.log"
    canary = EgressCanary()
    proxy = f"http://127.0.0.1:{canary.port}"
    env = dict(os.environ)
    (workdir / "tmp").mkdir(exist_ok=True)
    env.update({
        "TMPDIR": str(workdir / "tmp"),  # the server's temporary files, checked by the tests: none may stay
        "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
        "ALL_PROXY": proxy, "all_proxy": proxy,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
    })
    env.pop("MONAI_LABEL_APP_CONF", None)
    conf = {"models": "hybrid_ct", "model_dir": str(model_dir), "auto_scoring": "false",
            "auto_train_after": "3", "auto_train_params": json.dumps({"max_epochs": 1}),
            "stop_grace_s": "60", **(conf or {})}
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir),
           "--studies", studies_url or str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--log_config", str(_log_config(workdir / "logging.json", log_path))]
    for k, v in conf.items():
        cmd += ["--conf", k, str(v)]
    out = open(workdir / "server.stdout", "ab")
    proc = subprocess.Popen(cmd, cwd=str(workdir), env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", studies, model_dir, log_path, proc, canary, workdir, conf)
    session = requests.Session()
    session.trust_env = False
    deadline = time.monotonic() + startup_timeout_s
    while True:
        if proc.poll() is not None:
            stop_server(server)
            raise RuntimeError(f"the server exited with code {proc.returncode} during start-up:\n"
                               + (workdir / "server.stdout").read_text(errors="replace")[-4000:])
        try:
            if session.get(server.url + "/info/", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"the server did not answer /info/ within {startup_timeout_s:.0f} s:\n"
                               + server.log_tail())
        time.sleep(0.5)


def end_process(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Terminate ``proc`` (SIGTERM), kill it after ``grace_s`` seconds, and reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def stop_server(server: LiveServer) -> None:
    """Stop the server and any training / scoring subprocess it started."""
    import psutil

    if server.proc.poll() is None:
        try:
            children = psutil.Process(server.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        end_process(server.proc)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
    server.canary.close()


_SESSION: dict = {}
_LOCK = threading.Lock()


@pytest.fixture(scope="session")
def server(tmp_path_factory, request) -> LiveServer:
    """The live server (one per test session, shared by every module that imports this fixture)."""
    with _LOCK:
        live = _SESSION.get("server")
        if live is None:
            live = start_server(tmp_path_factory.mktemp("hybrid_ct_server"))
            _SESSION["server"] = live
            _SESSION["users"] = 0
        _SESSION["users"] += 1
    yield live
    with _LOCK:
        _SESSION["users"] -= 1
        last = _SESSION["users"] == 0
    if last:
        if request.session.testsfailed:
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            text = f"\n----- Hybrid CT server log (tail), {live.log_path} -----\n{live.log_tail(120)}\n"
            if reporter is not None:
                reporter.write_line(text)
            else:
                sys.stderr.write(text)
        stop_server(live)
        _SESSION.pop("server", None)


# ------------------------------------------------------------------------------ helpers for tests
def http():
    """A requests session that talks to 127.0.0.1 directly (never through an environment proxy)."""
    import requests

    s = requests.Session()
    s.trust_env = False
    return s


def wait_until(check, what: str, timeout_s: float = 600, interval_s: float = 0.5):
    """Poll ``check()`` (server state) until it returns a truthy value; bounded, never a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def training_idle(live) -> bool:
    """No training process on the server, and its last training task is not submitted or running."""
    s = http()
    if s.get(f"{live.url}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 200:
        return False
    r = s.get(f"{live.url}/train/", timeout=30)
    return (r.json() if r.status_code == 200 else {}).get("status") not in ("SUBMITTED", "RUNNING")


def wait_training_idle(live, timeout_s: float = 1800):
    wait_until(lambda: training_idle(live), "the server's training task to end", timeout_s=timeout_s)


def studies_digest(studies: Path) -> dict:
    """sha256 of every file under the studies folder (for 'left byte-for-byte unchanged')."""
    import hashlib

    out = {}
    for p in sorted(Path(studies).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(studies))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def parse_infer(resp):
    """``POST /infer`` answer (output=all) -> (params dict, label bytes, label file name)."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    params, data, name = {}, None, None
    for part in MultipartDecoder.from_response(resp).parts:
        disp = part.headers.get(b"Content-Disposition", b"").decode()
        if "filename=" in disp:
            data, name = part.content, disp.split("filename=")[-1].strip('"')
        elif 'name="params"' in disp:
            params = json.loads(part.content.decode())
    return params, data, name


def read_image_bytes(data: bytes, name: str):
    """SimpleITK image from file bytes (the extension of ``name`` tells the format)."""
    import tempfile

    import SimpleITK as sitk

    ext = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x" + ext)
        with open(p, "wb") as f:
            f.write(data)
        return sitk.ReadImage(p)


def phantom_files(folder: Path, seed: int, positive: bool = True, name: str = "case"):
    """Write a chest phantom (image .nii.gz, label .nii.gz) -> (image path, label path, image, label)."""
    import SimpleITK as sitk

    from hybrid_ct.data.phantom import make_phantom

    img, lab, _ = make_phantom(seed, shape=PHANTOM_SHAPE, positive=positive)
    folder.mkdir(parents=True, exist_ok=True)
    ip, lp = folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"
    sitk.WriteImage(sitk.Cast(img, sitk.sitkInt16), str(ip))
    sitk.WriteImage(lab, str(lp))
    return ip, lp, img, lab


def write_dicom_series(img, out_dir: Path) -> Path:
    """Write a 3D image as a CT DICOM series (int16 HU, one file per slice) into ``out_dir``."""
    import SimpleITK as sitk

    img = sitk.Cast(img, sitk.sitkInt16)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.4242"
    d = img.GetDirection()
    for i in range(img.GetDepth()):
        s = img[:, :, i]
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.3.{i + 1}",
                "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2", "0020|0013": str(i + 1),
                "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0020|0032": "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, i))),
                "0028|1052": "0", "0028|1053": "1"}
        for k, v in tags.items():
            s.SetMetaData(k, v)
        writer.SetFileName(str(out_dir / f"{i:04d}.dcm"))
        writer.Execute(s)
    return out_dir
