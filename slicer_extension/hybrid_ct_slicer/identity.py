"""Which image is this? The server image id and the checks that keep one patient's result off another.

A volume's node name ("2: CT Chest") says nothing about the patient, so the id sent to the server is
derived from what identifies the image:

- a volume loaded from DICOM: its SOP Instance UIDs (the volume node's ``DICOM.instanceUIDs``
  attribute) and Series Instance UID (subject hierarchy) -> ``dcm-<uids hash>-<content hash>``;
- any other volume: a hash of its voxels and geometry -> ``ct-<content hash>``;
- a volume that came from the server (Next sample) keeps the server's id as long as its voxels are
  the ones downloaded.

The content part is always there: the server refuses a second upload under an id it holds with
other content, and a volume whose voxels were changed in Slicer is another image.

Before skipping an upload the client asks the server whether it holds that EXACT file
(``HEAD /datastore/image?image=<id>&check_sum=SHA256:<hex>``). The segmentation made from a run is
stamped with the image id and the content hash, and Submit refuses it on any other image.

Qt-free and MRML-free: the MRML side (reading the attributes of nodes) is in :mod:`.mrml`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from .imageio import Geometry

#: node attributes (volume and segmentation nodes)
ID_ATTRIBUTE = "HybridCT.ImageId"
CONTENT_ATTRIBUTE = "HybridCT.ContentHash"
FILE_SHA_ATTRIBUTE = "HybridCT.FileSha256"  # sha256 of the file the server holds under the id (volumes)
#: what Slicer's DICOM plugins set on a scalar volume loaded from DICOM (space-separated SOP Instance UIDs)
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"

_CHUNK = 1 << 22


class IdentityError(ValueError):
    """A segmentation does not belong to the image it would be submitted for; the message says why."""


def content_hash(array: np.ndarray, geometry: Geometry) -> str:
    """sha256 (hex) of the voxels (dtype, shape, bytes) and the geometry (rounded to 1e-5 mm)."""
    arr = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    for values in (geometry.spacing, geometry.origin, geometry.direction):
        h.update(("|" + ",".join(f"{round(float(v), 5) + 0.0:.5f}" for v in values)).encode())
    flat = arr.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):  # hashlib releases the GIL on large buffers
        h.update(flat[start:start + _CHUNK])
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _uids(instance_uids: str | Iterable[str] | None) -> list[str]:
    if not instance_uids:
        return []
    if isinstance(instance_uids, str):
        instance_uids = instance_uids.split()
    return sorted({str(u).strip() for u in instance_uids if str(u).strip()})


def derive_image_id(content: str, *, series_uid: str | None = None,
                    instance_uids: str | Iterable[str] | None = None) -> str:
    """``dcm-<16 hex of the UIDs>-<12 hex of the content>`` for DICOM, else ``ct-<24 hex of the content>``."""
    uids = _uids(instance_uids)
    if series_uid or uids:
        key = (series_uid or "").strip() + "|" + "\\".join(uids)
        return f"dcm-{hashlib.sha256(key.encode()).hexdigest()[:16]}-{content[:12]}"
    return f"ct-{content[:24]}"


@dataclass(frozen=True)
class ImageIdentity:
    image_id: str
    content_hash: str
    source: str  # "dicom", "content" or "server"
    file_sha256: str | None = None  # known sha256 of the file the server holds under image_id

    def describe(self) -> str:
        what = {"dicom": "DICOM series", "server": "server image", "content": "volume content"}[self.source]
        return f"{self.image_id} (from the {what})"


def resolve_identity(array: np.ndarray, geometry: Geometry, *, series_uid: str | None = None,
                     instance_uids: str | Iterable[str] | None = None,
                     stamp: Mapping[str, str] | None = None) -> ImageIdentity:
    """The identity of a volume. ``stamp`` is what an earlier run or download wrote on the volume node
    (:data:`ID_ATTRIBUTE`, :data:`CONTENT_ATTRIBUTE`, :data:`FILE_SHA_ATTRIBUTE`): it is trusted only
    while the voxels and geometry are unchanged."""
    content = content_hash(array, geometry)
    stamp = stamp or {}
    if stamp.get(ID_ATTRIBUTE) and stamp.get(CONTENT_ATTRIBUTE) == content:
        image_id = stamp[ID_ATTRIBUTE]
        uids = bool(series_uid or _uids(instance_uids))
        source = "server" if not image_id.startswith(("ct-", "dcm-")) else ("dicom" if uids else "content")
        return ImageIdentity(image_id, content, source, stamp.get(FILE_SHA_ATTRIBUTE) or None)
    image_id = derive_image_id(content, series_uid=series_uid, instance_uids=instance_uids)
    return ImageIdentity(image_id, content, "dicom" if image_id.startswith("dcm-") else "content")


def volume_stamp(identity: ImageIdentity, file_sha: str | None) -> dict[str, str]:
    """Attributes to set on the volume node once the server holds the image (next runs skip the file)."""
    out = {ID_ATTRIBUTE: identity.image_id, CONTENT_ATTRIBUTE: identity.content_hash}
    if file_sha or identity.file_sha256:
        out[FILE_SHA_ATTRIBUTE] = file_sha or identity.file_sha256
    return out


def segmentation_stamp(identity: ImageIdentity) -> dict[str, str]:
    """Attributes that tie a segmentation to the image it was made on."""
    return {ID_ATTRIBUTE: identity.image_id, CONTENT_ATTRIBUTE: identity.content_hash}


def check_segmentation_image(seg_attributes: Mapping[str, str | None], identity: ImageIdentity, *,
                             seg_name: str = "the segmentation", volume_name: str = "the volume") -> str | None:
    """Raise :class:`IdentityError` when a stamped segmentation belongs to another image than ``identity``.

    Returns a note for an unstamped segmentation (made by hand or loaded from a file), else None.
    """
    image_id = seg_attributes.get(ID_ATTRIBUTE)
    content = seg_attributes.get(CONTENT_ATTRIBUTE)
    if not image_id and not content:
        return (f"{seg_name} was not made by Hybrid CT: it is sent as the correction of {volume_name} "
                f"({identity.image_id}).")
    if (content and content != identity.content_hash) or (not content and image_id != identity.image_id):
        raise IdentityError(
            f"{seg_name} belongs to image {image_id or '?'}, not to {volume_name} ({identity.image_id}): "
            f"its voxels or geometry differ. Choose the volume the segmentation was made on (or run the "
            f"model on {volume_name}) before submitting.")
    return None
