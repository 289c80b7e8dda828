"""Identity across SimpleITK versions (issue 28): the server compares image CONTENT, not file bytes.

SimpleITK 2.3 (Slicer 5.6) and 2.5 write one NIfTI header byte differently; gzip adds its own bytes.
The module's id is a hash of voxels and geometry, so after a Slicer upgrade (or from another
workstation) Run and Submit send the same id with a file whose bytes differ from the stored one. Here the
same volume is written twice, the second copy with one byte of the header's ``descrip`` field changed,
and the real server (tests/server_fixture.py) must take the second upload as the same image, while a
file with other voxels under that id is still refused (409).
"""

from __future__ import annotations

import gzip
import hashlib
import uuid

import numpy as np
import pytest

from hybrid_ct_slicer.client import HybridCTClient, ServerError
from hybrid_ct_slicer.identity import resolve_identity
from hybrid_ct_slicer.imageio import read_image, write_image
from hybrid_ct_slicer.testdata import make_chest_volume
from hybrid_ct_slicer.workflow import Workflow

from server_fixture import server  # noqa: F401  (the real app server)

pytestmark = [pytest.mark.server, pytest.mark.slow]

NIFTI_DESCRIP = slice(148, 228)  # char descrip[80] of the NIfTI-1 header


def _two_writers(tmp_path, ct, geometry):
    """The same volume as two .nii.gz files whose bytes differ by one header byte (+ gzip)."""
    plain = tmp_path / "a.nii"
    write_image(str(plain), ct, geometry)
    data = bytearray(plain.read_bytes())
    other = bytearray(data)
    other[NIFTI_DESCRIP.start] = (other[NIFTI_DESCRIP.start] + 1) % 128 or 65  # another writer's header byte
    a, b = tmp_path / "written_by_2_3.nii.gz", tmp_path / "written_by_2_5.nii.gz"
    a.write_bytes(gzip.compress(bytes(data), mtime=0))
    b.write_bytes(gzip.compress(bytes(other), mtime=1))
    return a, b


def test_same_volume_other_header_byte_is_the_same_image(server, tmp_path):
    ct, _label, geometry = make_chest_volume(shape=(12, 64, 64), seed=5)
    a, b = _two_writers(tmp_path, ct, geometry)
    assert hashlib.sha256(a.read_bytes()).digest() != hashlib.sha256(b.read_bytes()).digest()
    arr_a, geo_a = read_image(str(a))
    arr_b, geo_b = read_image(str(b))
    assert np.array_equal(arr_a, arr_b) and geo_a.almost_equal(geo_b)  # same content, other bytes

    client = HybridCTClient(server.url, timeout=60)
    image_id = f"versions-{uuid.uuid4().hex[:8]}"
    first = client.upload_image(str(a), image_id)
    assert first.get("image") == image_id and not first.get("unchanged")
    # the other writer's file: the bytes differ (HEAD with its checksum says so) ...
    assert not client.has_image(image_id, hashlib.sha256(b.read_bytes()).hexdigest())
    # ... but the upload is recognised as the same image instead of a 409 the user cannot resolve
    second = client.upload_image(str(b), image_id)
    assert second.get("unchanged") is True

    # the module's Run flow on that already-sent scan: upload_volume writes its own file (other bytes),
    # the server takes it as unchanged, inference runs
    identity = resolve_identity(ct, geometry)
    identity = type(identity)(image_id, identity.content_hash, "content")
    workflow = Workflow(HybridCTClient(server.url, timeout=60, long_timeout=900), work_dir=str(tmp_path / "work"))
    result = workflow.run_volume(identity, ct, geometry)
    assert result.uploaded is False and result.image_id == image_id
    assert result.label_path

    # and Submit of a correction for it
    answer, _sha = workflow.submit_volume_correction(identity, ct, geometry, (ct > -600).astype(np.uint8), geometry)
    assert answer.get("label") or answer.get("image") == image_id


def test_other_voxels_under_the_same_id_are_still_refused(server, tmp_path):
    ct, _label, geometry = make_chest_volume(shape=(12, 64, 64), seed=6)
    client = HybridCTClient(server.url, timeout=60)
    image_id = f"versions-{uuid.uuid4().hex[:8]}"
    first = tmp_path / "first.nii.gz"
    write_image(str(first), ct, geometry)
    client.upload_image(str(first), image_id)
    changed = ct.copy()
    changed[6, 32, 32] += 100  # one voxel
    second = tmp_path / "second.nii.gz"
    write_image(str(second), changed, geometry)
    with pytest.raises(ServerError) as err:
        client.upload_image(str(second), image_id)
    assert err.value.status == 409
    moved = type(geometry)(geometry.spacing, tuple(o + 1.0 for o in geometry.origin), geometry.direction)
    third = tmp_path / "third.nii.gz"
    write_image(str(third), ct, moved)  # same voxels, shifted by 1 mm: another image
    with pytest.raises(ServerError) as err:
        client.upload_image(str(third), image_id)
    assert err.value.status == 409
