"""What a killed process leaves behind, and how a start-up clears it.

Every temporary file the app writes names its writer's PID: ``.<name>.<pid>.<random>.tmp`` (atomic writes
of the model store and the datastore index), ``<file>.<pid>.part`` (images and labels being copied into
the studies folder) and ``hybrid_ct_<kind>_<pid>_<random>`` in the temp folder (uploads being checked,
results being sent). A process killed with SIGKILL (or by a power cut) cannot remove its own; the next
server start removes those whose writer is no longer alive, and leaves a live writer's alone (a training
beside the server, a second server on the same folders).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

STORE_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$|^.+\.(\d+)\.part$")
UPLOAD_TEMP_RE = re.compile(r"^hybrid_ct_[a-z]+_(\d+)_")


def temp_prefix(kind: str) -> str:
    """Prefix of a temporary file of this process in the temp folder (``upload``, ``label``, ``seg``, ``dicom``)."""
    return f"hybrid_ct_{kind}_{os.getpid()}_"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a zombie (killed, not yet reaped) is dead for this purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _dead_writer(match) -> bool:
    pid = next((g for g in match.groups() if g), None)
    return pid is not None and not pid_alive(int(pid))


def remove_stale_temps(root, recursive: bool = True) -> list:
    """Remove the temporary files under ``root`` whose writer is gone; returns their paths (relative)."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for folder, _, files in walker:
        for name in files:
            m = STORE_TEMP_RE.match(name)
            if m and _dead_writer(m):
                path = Path(folder) / name
                try:
                    path.unlink()
                    removed.append(str(path.relative_to(root)))
                except OSError as e:
                    logger.warning("cannot remove the stale temporary file %s: %s", path, e.strerror)
    return removed


def remove_stale_uploads(tmp_dir: str | None = None) -> list:
    """Remove ``hybrid_ct_<kind>_<pid>_*`` files and folders of dead processes from the temp folder."""
    tmp_dir = tmp_dir or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp_dir)
    except OSError:
        return []
    for name in names:
        m = UPLOAD_TEMP_RE.match(name)
        if m and _dead_writer(m):
            path = os.path.join(tmp_dir, name)
            try:
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
                removed.append(name)
            except OSError as e:
                logger.warning("cannot remove the stale temporary file %s: %s", path, e.strerror)
    return removed


# ------------------------------------------------------------------------------ fault injection (tests only)
FAULT_ENV = "HYBRID_CT_FAULT_AT"


def fault_point(name: str) -> None:
    """Tests only (tests/test_server_faults.py): when $HYBRID_CT_FAULT_AT names this point, SIGKILL the server
    and this process here, as a power cut would. Unset in production: a no-op."""
    if os.environ.get(FAULT_ENV) != name:
        return
    import signal

    server = os.environ.get("HYBRID_CT_SERVER_PID")
    logger.error("fault injection: SIGKILL at %s", name)
    if server and server.isdigit() and int(server) != os.getpid():
        os.kill(int(server), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
