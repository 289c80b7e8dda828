"""A real PACS for tests: Orthanc with its DICOMweb plugin on 127.0.0.1, a free port, a temporary
storage folder; plus ``dciodvfy`` (dicom3tools) as a DICOM checker.

    from orthanc_fixture import orthanc  # noqa: F401  (the pytest fixture: one Orthanc per module)

    def test_x(orthanc):
        orthanc.upload_folder(series_dir)
        requests.get(orthanc.dicomweb + "/studies")

``scripts/setup.sh`` installs the Debian packages ``orthanc``, ``orthanc-dicomweb`` and
``dicom3tools``; where they are missing the tests that need them skip with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC_BIN = os.environ.get("HYBRID_CT_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get("HYBRID_CT_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


def orthanc_missing() -> str:
    """Why Orthanc cannot run here ('' when it can)."""
    if not os.access(ORTHANC_BIN, os.X_OK):
        return f"Orthanc is not installed ({ORTHANC_BIN} missing): run scripts/setup.sh (apt-get install orthanc)"
    if not os.path.isfile(DICOMWEB_PLUGIN):
        return f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}): apt-get install orthanc-dicomweb"
    return ""


@dataclass
class Orthanc:
    url: str
    port: int
    storage: Path
    proc: subprocess.Popen
    log_path: Path

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def upload_file(self, path) -> dict:
        from server_fixture import http

        r = http().post(self.url + "/instances", data=Path(path).read_bytes(), timeout=60)
        r.raise_for_status()
        return r.json()

    def upload_folder(self, folder) -> list:
        """POST every file of ``folder`` (not recursive) to Orthanc's REST API; returns the answers."""
        return [self.upload_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file()]

    def series_uids(self, modality: str | None = None) -> list:
        from server_fixture import http

        params = {"Modality": modality} if modality else {}
        r = http().get(self.dicomweb + "/series", params=params, timeout=30)
        r.raise_for_status()
        return [s["0020000E"]["Value"][0] for s in (r.json() if r.content else [])]

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no Orthanc log)"


def start_orthanc(workdir: Path, timeout_s: float = 60) -> Orthanc:
    from server_fixture import free_port, http

    why = orthanc_missing()
    if why:
        pytest.skip(why)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = workdir / "storage"
    cfg = {
        "Name": "HybridCTTest", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": False, "HttpsVerifyPeers": False, "StableAge": 1,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    log_path = workdir / "orthanc.log"
    proc = subprocess.Popen([ORTHANC_BIN, f"--logfile={log_path}", str(cfg_path)], cwd=str(workdir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    o = Orthanc(f"http://127.0.0.1:{port}", port, storage, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {proc.returncode} at start-up:\n{o.log_tail()}")
        try:
            if http().get(o.dicomweb + "/studies", timeout=5).status_code == 200:
                return o
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            stop_orthanc(o)
            raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s:\n{o.log_tail()}")
        time.sleep(0.3)


def stop_orthanc(o: Orthanc) -> None:
    from server_fixture import end_process

    if o.proc.poll() is None:
        end_process(o.proc)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    o = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield o
    stop_orthanc(o)


# ------------------------------------------------------------------------------ dciodvfy
# Warnings accepted in the project's DICOM-SEG files, with the reason:
ACCEPTED_WARNINGS = {
    # the SEG copies the patient / study identity of its source series and never invents one: the
    # synthetic test series (written by SimpleITK) has no Patient ID and no Study ID; real series do
    "Missing attribute or value that would be needed to build DICOMDIR - Patient ID",
    "Missing attribute or value that would be needed to build DICOMDIR - Study ID",
}


def dciodvfy(path) -> tuple:
    """Run dciodvfy on ``path`` -> (errors, warnings not accepted, all output lines). Skips the test
    when dicom3tools is not installed."""
    if not os.access(DCIODVFY, os.X_OK):
        pytest.skip("dciodvfy (dicom3tools) is not installed: run scripts/setup.sh")
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=300)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")
                and ln.split(" - ", 1)[-1] not in ACCEPTED_WARNINGS]
    return errors, warnings, lines
