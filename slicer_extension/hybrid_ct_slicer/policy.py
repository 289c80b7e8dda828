"""The module's decisions, free of Qt so that they are tested headless.

- which volume the buttons act on (:func:`choose_volume`);
- whether sending a CT to a server needs the user's consent or a warning (:func:`upload_consent`);
- whether a new result may replace a segmentation (:func:`replace_decision`);
- temp files for patient images, always removed (:func:`temp_path`).
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from .settings import normalise_server_url

#: QSettings key holding the servers the user agreed to send images to (a list of normalised URLs)
SETTINGS_KEY_APPROVED_SERVERS = "HybridCT/approvedServers"


# ------------------------------------------------------------------------------- volume in view
@dataclass(frozen=True)
class VolumeChoice:
    volume_id: str | None
    followed_view: bool  # True when the red view's background decided
    reason: str


def choose_volume(view_volume_id: str | None, picked_volume_id: str | None,
                  existing_ids: Iterable[str]) -> VolumeChoice:
    """The volume Run and Submit use: the one the user picked in the selector while it still exists,
    else the red slice view's background volume, else none."""
    existing = set(existing_ids)
    if picked_volume_id and picked_volume_id in existing and picked_volume_id != view_volume_id:
        return VolumeChoice(picked_volume_id, False, "chosen in 'Input volume' (not the one in the red view)")
    if view_volume_id and view_volume_id in existing:
        return VolumeChoice(view_volume_id, True, "the volume shown in the red view")
    if picked_volume_id and picked_volume_id in existing:
        return VolumeChoice(picked_volume_id, False, "chosen in 'Input volume'")
    return VolumeChoice(None, False, "no volume: load a CT")


# ------------------------------------------------------------------------------- privacy
def is_local_host(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 and ::1 are this computer."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Consent:
    server: str  # normalised URL, the key remembered in the settings
    local: bool
    ask: bool  # ask the user before the first upload to this server
    warning: str  # '' or why plain http to this host is unsafe
    question: str  # the text to show when asking


def upload_consent(url: str, approved: Iterable[str] | str | None) -> Consent:
    """Sending a CT to a server that is not this computer needs the user's consent, once per server
    (``approved`` = the servers remembered in the settings); plain http to another host also warns."""
    server = normalise_server_url(url)
    parts = urlsplit(server)
    local = is_local_host(parts.hostname)
    if isinstance(approved, str):
        approved = [approved]
    known = {str(a) for a in (approved or [])}
    warning = ""
    if not local and parts.scheme == "http":
        warning = (f"The connection to {parts.hostname} is plain http: the CT and the results cross the network "
                   f"unencrypted. Use https unless this network is trusted.")
    question = (f"Send patient images to the server {server}?\n\nThe CT in view is uploaded to this server "
                f"(it leaves this computer) and kept in its datastore.")
    if warning:
        question += "\n\n" + warning
    return Consent(server, local, ask=not local and server not in known, warning=warning, question=question)


def remember_approval(approved: Iterable[str] | str | None, server: str) -> list[str]:
    """The settings value after the user agreed to ``server``."""
    if isinstance(approved, str):
        approved = [approved]
    out = [str(a) for a in (approved or []) if a]
    if server not in out:
        out.append(server)
    return out


@contextmanager
def temp_path(folder: str, suffix: str = ".nii.gz", prefix: str = "HybridCT_") -> Iterator[str]:
    """A fresh file path in ``folder`` (Slicer's temp folder), removed when the block ends, whatever happens."""
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield path
    finally:
        remove_quietly(path)


def remove_quietly(path: str | None) -> None:
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------- edits
def replace_decision(edited: bool, same_image: bool) -> str:
    """What Run does with the current segmentation: ``"new"`` (another image: a new segmentation),
    ``"replace"`` (same image, unedited result), ``"ask"`` (same image, edited by the radiologist)."""
    if not same_image:
        return "new"
    return "ask" if edited else "replace"
