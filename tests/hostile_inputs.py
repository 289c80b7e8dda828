"""The bad-input corpus: every kind of hostile or careless request the server has been tried with.

Each :class:`Case` builds its request from synthetic phantoms (nothing copied from ../shared) and names
the status and the words the answer must carry. ``tests/test_app_hostile.py`` runs every case against
the real server and checks, for each, the status, the message, that the studies and model folders are
byte-identical afterwards and that the server left no temporary file.
"""
from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from server_fixture import LABELLED, UNLABELLED, http, phantom_files, write_dicom_series

TIMEOUT = 120


@dataclass
class Case:
    kind: str
    send: Callable  # (live, tmp: Path) -> requests.Response
    status: int
    words: tuple = ()

    def __str__(self):
        return self.kind


# ------------------------------------------------------------------------------------------ builders
def _phantom(tmp: Path, seed: int = 5):
    ip, lp, img, lab = phantom_files(tmp / f"p{seed}", seed=seed)
    return ip, lp, img, lab


def _volume_bytes(img, tmp: Path, ext: str, compress: bool = True) -> bytes:
    p = tmp / f"v{ext}"
    sitk.WriteImage(img, str(p), useCompression=compress)
    return p.read_bytes()


def _ct(tmp, ext=".nii.gz", compress=True):
    return _volume_bytes(sitk.Cast(_phantom(tmp)[2], sitk.sitkInt16), tmp, ext, compress)


def _nifti_with_pixdim(tmp, index: int, value: float) -> bytes:
    raw = bytearray(gzip.decompress(_ct(tmp)))
    struct.pack_into("<f", raw, 76 + 4 * index, value)  # pixdim[index]
    return gzip.compress(bytes(raw))


def _header_bomb() -> bytes:
    """65 bytes of gzip whose NIfTI header claims 1024 x 1024 x 256 int16 voxels (512 MiB)."""
    import nibabel as nib

    h = nib.Nifti1Header()
    h.set_data_shape((1024, 1024, 256))
    h.set_data_dtype(np.int16)
    h["pixdim"][1:4] = 1.0
    return gzip.compress(h.binaryblock + b"\0" * 4, 9)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_crc(data: bytes) -> bytes:
    d = bytearray(data)
    d[-6] ^= 0xFF  # inside the gzip trailer's CRC32
    return bytes(d)


def _slice_2d(tmp) -> bytes:
    a = sitk.GetArrayFromImage(sitk.Cast(_phantom(tmp)[2], sitk.sitkInt16))[4]
    return _volume_bytes(sitk.GetImageFromArray(a), tmp, ".nii.gz")


def _one_slice_3d(tmp) -> bytes:
    img = sitk.Cast(_phantom(tmp)[2], sitk.sitkInt16)
    return _volume_bytes(img[:, :, 4:5], tmp, ".nii.gz")


def _trailing_data(tmp) -> bytes:
    return gzip.compress(gzip.decompress(_ct(tmp)) + b"\0" * (3 << 20))


def _dicom_slice(tmp) -> bytes:
    img = _phantom(tmp)[2]
    folder = write_dicom_series(img, tmp / "dcm")
    return sorted(folder.iterdir())[0].read_bytes()


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _zip_bomb() -> bytes:
    """A zip whose one member unpacks to 600 MiB of zeros (about 600 KiB packed)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, z.open("big.dcm", "w", force_zip64=True) as f:
        block = b"\0" * (1 << 20)
        for _ in range(600):
            f.write(block)
    return buf.getvalue()


ESCAPE = f"hybrid_ct_escape_{uuid.uuid4().hex[:12]}"  # files the session tar would write if it could


def _tar_escape() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name in (f"../../{ESCAPE}.txt", f"/tmp/{ESCAPE}_abs.txt"):
            data = b"written through a crafted tar"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ requests
def put_image(image_id, name, data, params="{}"):
    def send(live, tmp):
        body = data(tmp) if callable(data) else data
        q = {} if image_id is None else {"image": image_id}
        return http().put(f"{live.url}/datastore/", params=q, files={"file": (name, body), "params": (None, params)},
                          timeout=TIMEOUT)
    return send


def put_label(name, data, image_id=LABELLED[1], tag="final", params=None):
    def send(live, tmp):
        body = data(tmp) if callable(data) else data
        return http().put(f"{live.url}/datastore/label", params={"image": image_id, "tag": tag},
                          files={"label": (name, body), "params": (None, json.dumps(params or {}))}, timeout=TIMEOUT)
    return send


def request(method, path, **kw):
    def send(live, tmp):
        return http().request(method, f"{live.url}{path}", timeout=TIMEOUT, **kw)
    return send


def infer_upload(name, data, params="{}"):
    def send(live, tmp):
        body = data(tmp) if callable(data) else data
        return http().post(f"{live.url}/infer/hybrid_ct", params={"output": "json"},
                           files={"file": (name, body), "params": (None, params)}, timeout=TIMEOUT)
    return send


def _stored_label(live, transform):
    """A label for LABELLED[1] on its own grid, written by SimpleITK then transformed (bytes -> bytes)."""
    img = sitk.ReadImage(str(live.studies / f"{LABELLED[1]}.nii.gz"))
    lab = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    lab.CopyInformation(img)
    arr = sitk.GetArrayFromImage(lab)
    arr[2:6, 20:40, 20:40] = 1
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return transform(out)


def put_stored_label(name, transform):
    def send(live, tmp):
        def to_bytes(img, ext=".nii.gz"):
            return _volume_bytes(img, tmp, ext)
        body = _stored_label(live, lambda img: transform(img, to_bytes))
        return http().put(f"{live.url}/datastore/label", params={"image": LABELLED[1], "tag": "final"},
                          files={"label": (name, body), "params": (None, "{}")}, timeout=TIMEOUT)
    return send


def _label_pixdim0(img, to_bytes):
    raw = bytearray(gzip.decompress(to_bytes(img)))
    struct.pack_into("<f", raw, 80, 0.0)
    return gzip.compress(bytes(raw))


def _label_bigger(img, to_bytes):
    raw = bytearray(gzip.decompress(to_bytes(img)))
    struct.pack_into("<h", raw, 46, 4096)  # dim[3]: claims 4096 slices on the same grid
    return gzip.compress(bytes(raw))


# ------------------------------------------------------------------------------------------ the corpus
ROUTES = [
    Case("session upload of a crafted tar", request("PUT", "/session/", params={"uncompress": "true"},
                                                   files={"files": ("x.tar", _tar_escape())}), 404, ("not served",)),
    Case("batch infer writing final labels", request("POST", "/batch/infer/hybrid_ct", json={"label_tag": "final"}),
         404, ("not served",)),
    Case("WSI infer of a server path", request("POST", "/infer/wsi_v2/hybrid_ct",
                                               json={"image": "/etc/shadow", "save_label": True}), 404),
    Case("model upload over the served checkpoint", request("PUT", "/model/hybrid_ct",
                                                            files={"file": ("m.pt", b"not a model")}), 404),
    Case("model delete", request("DELETE", "/model/hybrid_ct"), 404),
    Case("model weights download", request("GET", "/model/hybrid_ct"), 404),
    Case("update label info unchecked", request("PUT", "/datastore/updatelabelinfo", params={"label": "x"},
                                                data={"params": "{bad"}), 404),
    Case("scoring with an unknown method", request("POST", "/scoring/nope"), 404, ("no scoring method",)),
    Case("scoring with an unknown param", request("POST", "/scoring/uncertainty", json={"bogus": 1}), 400,
         ("unknown scoring parameter", "bogus")),
    Case("DICOM proxy", request("GET", "/proxy/dicom/studies"), 404),
    Case("OHIF viewer", request("GET", "/ohif/"), 404),
    Case("server log download", request("GET", "/logs/"), 404),
    Case("whole dataset zip download", request("GET", "/datastore/dataset"), 404),
    Case("API docs and schema", request("GET", "/openapi.json"), 404),
    Case("app reload", request("POST", "/reload"), 404),
    Case("deprecated train-all", request("POST", "/train/", json={}), 405, ("not allowed",)),
]

IMAGES = [
    Case("truncated .nii.gz image", put_image("trunc", "ct.nii.gz", lambda t: _half(_ct(t))), 422,
         ("truncated", "ct.nii.gz")),
    Case("corrupt gzip CRC", put_image("crc", "ct.nii.gz", lambda t: _flip_crc(_ct(t))), 422, ("corrupt", "crc")),
    Case("truncated raw .nii", put_image("trunc raw", "ct.nii", lambda t: _half(_ct(t, ".nii", False))), 422,
         ("truncated",)),
    Case("truncated .nrrd", put_image("trunc nrrd", "ct.nrrd", lambda t: _half(_ct(t, ".nrrd"))), 422, ("truncated",)),
    Case("truncated .mha", put_image("trunc mha", "ct.mha", lambda t: _half(_ct(t, ".mha"))), 422, ("truncated",)),
    Case("voxel spacing 0", put_image("sp0", "ct.nii.gz", lambda t: _nifti_with_pixdim(t, 1, 0.0)), 422,
         ("spacing",)),
    Case("negative voxel spacing", put_image("spneg", "ct.nii.gz", lambda t: _nifti_with_pixdim(t, 3, -2.0)), 422,
         ("spacing",)),
    Case("NaN voxel spacing", put_image("spnan", "ct.nii.gz", lambda t: _nifti_with_pixdim(t, 2, float("nan"))), 422,
         ("spacing",)),
    Case("2D NIfTI slice", put_image("slice", "slice.nii.gz", _slice_2d), 422, ("2d", "whole ct volumes")),
    Case("3D NIfTI of one slice", put_image("one slice", "one.nii.gz", _one_slice_3d), 422, ("slice",)),
    Case("single DICOM slice", put_image("dcm slice", "s.dcm", _dicom_slice), 422, ("slice",)),
    Case("header claims 1024x1024x256 (65 bytes)", put_image("bomb", "bomb.nii.gz", _header_bomb()), 422,
         ("claims", "1024 x 1024 x 256")),
    Case("NRRD with a detached data file", put_image("detached", "x.nrrd",
                                                     b"NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 8\n"
                                                     b"encoding: raw\ndata file: /etc/passwd\n\n"), 422,
         ("separate data file",)),
    Case("MHA with an external data file", put_image("detached mha", "x.mha",
                                                     b"ObjectType = Image\nNDims = 3\nDimSize = 64 64 8\n"
                                                     b"ElementType = MET_SHORT\nElementDataFile = /etc/passwd\n"), 422,
         ("separate data file",)),
    Case("more data than the header claims", put_image("trailing", "ct.nii.gz", _trailing_data), 422,
         ("more data",)),
    Case("zip member escaping with ../", put_image("zip escape", "s.zip",
                                                   _zip({f"../../{ESCAPE}_zip.dcm": b"DICM" * 10})), 422),
    Case("zip bomb (600 MiB of zeros)", put_image("zip bomb", "s.zip", lambda t: _zip_bomb()), 422, ("unpacks to",)),
    Case("random bytes as .nii.gz", put_image("garbage", "g.nii.gz", np.random.default_rng(0).bytes(4000)), 422,
         ("cannot read",)),
    Case("empty file", put_image("empty", "e.nii.gz", b""), 422, ("empty",)),
    Case("shell script", put_image("script", "evil.sh", b"#!/bin/sh\nrm -rf /\n"), 422, ("unsupported file type",)),
    Case("params not JSON", put_image("ok", "ct.nii.gz", _ct, params="{not json"), 400, ("json",)),
    Case("unreadable diagnosis", put_image("ok", "ct.nii.gz", _ct, params=json.dumps({"diagnosis": "maybe"})), 400,
         ("diagnosis",)),
    Case("existing id, other content", put_image(LABELLED[0], "ct.nii.gz", lambda t: _ct(t)), 409,
         ("already exists",)),
    Case("id that escapes", put_image("../evil", "ct.nii.gz", _ct), 400, ("not paths",)),
    Case("absolute id", put_image("/tmp/abs", "ct.nii.gz", _ct), 400, ("not paths",)),
]

LABELS = [
    Case("truncated label", put_stored_label("l.nii.gz", lambda img, b: _half(b(img))), 422,
         ("truncated", "l.nii.gz")),
    Case("label spacing 0", put_stored_label("l.nii.gz", _label_pixdim0), 422, ("spacing",)),
    Case("label header claims more than the image", put_stored_label("l.nii.gz", _label_bigger), 422, ("claims",)),
    Case("label of another shape", put_label("l.nii.gz", lambda t: _volume_bytes(
        sitk.Image([32, 32, 8], sitk.sitkUInt8), t, ".nii.gz")), 422, ("shape",)),
    Case("label with unknown values", put_stored_label("l.nii.gz", lambda img, b: b(img * 7)), 422, ("unknown values",)),
    Case("label for an unknown image", put_label("l.nii.gz", b"x", image_id="no such image"), 404, ("not in",)),
    Case("label tag that escapes", put_label("l.nii.gz", b"x", tag="../final"), 400, ("tag",)),
]

TASKS = [
    Case("infer upload truncated", infer_upload("ct.nii.gz", lambda t: _half(_ct(t))), 422, ("truncated", "ct.nii.gz")),
    Case("infer upload header bomb", infer_upload("bomb.nii.gz", _header_bomb()), 422, ("claims",)),
    Case("infer result saved as final", request("POST", "/infer/hybrid_ct", params={"image": UNLABELLED[0]},
                                                files={"params": (None, json.dumps({"label_tag": "final"}))}), 400,
         ("original",)),
    Case("infer as DICOM-SEG", request("POST", "/infer/hybrid_ct", params={"image": UNLABELLED[0],
                                                                          "output": "dicom_seg"},
                                       files={"params": (None, "{}")}), 400, ("dicom_seg",)),
    Case("infer an unknown model", request("POST", "/infer/other", params={"image": UNLABELLED[0]},
                                           files={"params": (None, "{}")}), 404, ("no model",)),
    Case("infer an unknown image", request("POST", "/infer/hybrid_ct", params={"image": "no such"},
                                           files={"params": (None, "{}")}), 404, ("not in the datastore",)),
    Case("train with a typo key", request("POST", "/train/hybrid_ct", json={"epochs": -1}), 400,
         ("unknown train parameter", "epochs", "max_epochs")),
    Case("train with a bad value", request("POST", "/train/hybrid_ct", json={"max_epochs": "many"}), 400,
         ("max_epochs",)),
    Case("train an unknown model", request("POST", "/train/other", json={}), 404, ("no trainer",)),
    Case("image check with an unknown hash algorithm", request("HEAD", "/datastore/image",
                                                             params={"image": LABELLED[0], "check_sum": "CRC32:00"}),
         400),
    Case("roll back to an unknown version", request("POST", "/hybrid_ct/rollback", params={"version": "v0999"}), 404,
         ("unknown",)),
    Case("roll back to a path", request("POST", "/hybrid_ct/rollback", params={"version": "../pretrained"}), 404,
         ("unknown",)),
]

CORPUS = ROUTES + IMAGES + LABELS + TASKS
