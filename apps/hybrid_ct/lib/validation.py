"""Checks on everything a client sends: identifiers, uploaded images, label maps and their label_info.

Nothing here touches the datastore: the HTTP layer (``lib/endpoints.py``) runs these checks on
temporary copies first and only then hands a clean file to the datastore, so a refused request
leaves the studies folder byte-for-byte unchanged.

Errors: :class:`BadRequest` (HTTP 400: malformed ids, tags, params) and every other
``hybrid_ct.errors.InputError`` (HTTP 422: the content is not a usable chest CT / label map).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import tempfile
import zipfile
import zlib

import numpy as np
import SimpleITK as sitk

from hybrid_ct import LABELS
from hybrid_ct.contract import FOREGROUND, canonical_name  # noqa: F401  (label name synonyms: hybrid_ct/contract.json)
from hybrid_ct.errors import InputError
from hybrid_ct.imaging.filecheck import DEFAULT_MAX_VOXELS, check_volume_file, volume_kind
from hybrid_ct.imaging.chest import check_ct
from hybrid_ct.imaging.reader import read_image

from .recovery import temp_prefix


class BadRequest(InputError):
    """Malformed request parameter (HTTP 400)."""


class NotFound(InputError):
    """The image / label / version named does not exist (HTTP 404)."""


class Conflict(InputError):
    """The request conflicts with the server state (HTTP 409)."""


class Forbidden(InputError):
    """The caller's role may not do this (HTTP 403), e.g. delete a final label without the admin token."""


ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.+\-]{0,199}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
STORED_EXT = (".nii.gz", ".nii", ".nrrd")  # what the datastore keeps as images and labels
UPLOAD_EXT = STORED_EXT + (".mha", ".dcm", ".zip")  # accepted uploads (the last three are converted)
LABEL_EXT = STORED_EXT + (".mha",)
MIN_SLICES = 8  # fewer axial slices is not a chest CT volume (a slice or a slab); conf min_slices


def check_id(value, what: str = "image id") -> str:
    """An id is data, never a path: letters, digits, ' ', '.', '_', '+', '-'; no '/', '\\', '..', leading dot."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what} is missing")
    if "/" in value or "\\" in value or "\x00" in value or ".." in value or os.path.isabs(value):
        raise BadRequest(f"{what} {value!r} is refused: ids are names, not paths ('/', '\\', '..' are not allowed)")
    if not ID_RE.match(value) or value.strip() != value:
        raise BadRequest(f"{what} {value!r} is refused: use up to 200 letters, digits, spaces, '.', '_', '+', '-' "
                         "(starting with a letter, digit or '_', no trailing blank)")
    return value


def check_tag(value) -> str:
    if not isinstance(value, str) or not TAG_RE.match(value):
        raise BadRequest(f"label tag {value!r} is refused: use letters, digits, '_' or '-' (e.g. 'final')")
    return value


def parse_json_param(text, what: str = "params") -> dict:
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def file_extension(name: str | None) -> str:
    low = (name or "").lower()
    for ext in (".nii.gz", ".seg.nrrd") + UPLOAD_EXT:
        if low.endswith(ext):
            return ext
    return os.path.splitext(low)[1]


def normalise_diagnosis(value):
    """'positive' / 'negative' from the usual spellings; None when absent; BadRequest when unreadable."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "positive" if value else "negative"
    if isinstance(value, (int, float)) and value in (0, 1):
        return "positive" if value == 1 else "negative"
    text = str(value).strip().lower()
    if text in ("positive", "pos", "1", "true", "yes", "covid", "infected"):
        return "positive"
    if text in ("negative", "neg", "0", "false", "no", "normal", "healthy"):
        return "negative"
    raise BadRequest(f"diagnosis {value!r} is not understood: use 'positive' or 'negative'")


# ---------------------------------------------------------------------------------------- images
def upload_name(filename, field: str) -> str:
    """How messages name an upload: the client's own file name (no folders, printable, short) and field."""
    base = re.split(r"[\\/]", str(filename or ""))[-1]
    base = "".join(c for c in base if c.isprintable())[:80]
    return f"upload {base!r} (field {field!r})" if base else f"the upload in field {field!r}"


def scrub(message: str, paths: dict) -> str:
    """Replace server paths (temporary files and folders) in ``message`` by what the client knows them as."""
    for path, name in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        if path:
            message = message.replace(path, name)
    return TEMP_PATH_RE.sub("the uploaded file", message)


TEMP_PATH_RE = re.compile(re.escape(tempfile.gettempdir().rstrip("/")) + r"/hybrid_ct_[^\s'\"),:;]*")


def _extract_dicom_zip(path: str, out_dir: str, max_bytes: int) -> str:
    """Unpack a zip of DICOM files safely (no path from the archive is used; size-limited)."""
    try:
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            total = sum(m.file_size for m in members)
            if not members:
                raise InputError("the zip archive is empty: expected the DICOM files of one CT series")
            if total > max_bytes:
                raise InputError(f"the zip archive unpacks to {total / 2**20:.0f} MiB, more than the "
                                 f"{max_bytes / 2**20:.0f} MiB allowed for one CT series")
            for i, m in enumerate(members):
                with z.open(m) as src, open(os.path.join(out_dir, f"{i:06d}.dcm"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error, ValueError,
            RuntimeError, UnicodeDecodeError, struct.error) as e:  # RuntimeError: an encrypted member
        raise InputError(f"not a readable zip archive: {e}") from None
    except OSError as e:
        # a corrupt member offset seeks before the start (EINVAL) and a bz2/lzma member with bad data raises
        # without an errno (both found by the fuzzer, CI seed 32); a failed write (ENOSPC, EIO) is the server's
        if e.errno not in (None, errno.EINVAL):
            raise
        raise InputError(f"not a readable zip archive: a member is corrupt ({e.strerror or e})") from None
    return out_dir


BIG_ENDIAN = "1.2.840.10008.1.2.2"


def _read_dicom_header(path: str):
    """pydicom's header of ``path`` (None when it is not DICOM). A file whose encoding contradicts its
    transfer syntax (pydicom falls back with a warning; GDCM then spent 45 s on an 8-slice series, found by
    the fuzzer) or in the retired big-endian syntax is refused."""
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"Expected (explicit|implicit) VR")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except UserWarning as w:
            raise InputError(f"a DICOM file's encoding does not match its transfer syntax ({w})") from None
        except Exception:  # noqa: BLE001 - not DICOM: the series reader decides what it makes of it
            return None
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax == BIG_ENDIAN:
        raise InputError("a DICOM file uses the retired Explicit VR Big Endian transfer syntax: export the series "
                         "as little endian (or JPEG / JPEG 2000 / RLE)")
    return ds


def _check_series_geometry(folder: str) -> None:
    """The slices of a DICOM series must be placeable and evenly spaced: GDCM silently reads a duplicated
    file as an extra slice and a missing one as a normal gap, so the volume would have the wrong length or
    spacing (the fuzzer found both). InputError (422) otherwise."""
    where, missing = [], 0
    for f in sorted(os.listdir(folder)):
        ds = _read_dicom_header(os.path.join(folder, f))
        if ds is None or "Rows" not in ds:  # not DICOM, or not an image (e.g. a DICOMDIR)
            continue
        try:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
            ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
            normal = np.cross(iop[:3], iop[3:6])
            if iop.size != 6 or ipp.size != 3 or not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
                raise ValueError
            where.append(float(np.dot(normal / np.linalg.norm(normal), ipp)))
        except (AttributeError, TypeError, ValueError, IndexError):
            missing += 1
    if len(where) + missing < 2:
        return
    if missing:
        raise InputError(f"{missing} of the {len(where) + missing} DICOM slices have no usable ImagePositionPatient "
                         "/ ImageOrientationPatient: the slices cannot be placed")
    z = np.sort(np.array(where))
    gaps = np.diff(z)
    same = int((gaps < 1e-3).sum())
    if same:
        raise InputError(f"the DICOM series has {same} slice(s) at the same position as another (a duplicated file?): "
                         "send each slice once")
    step = float(np.median(gaps))
    worst = float(np.abs(gaps - step).max())
    if worst > max(0.1 * step, 0.05):
        raise InputError(f"the DICOM slices are not evenly spaced (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm, "
                         f"typically {step:.3g} mm): a slice is missing or the series is mixed")


def _check_dicom_file(path: str, max_voxels: int) -> int:
    """Voxels a single DICOM file claims (rows x columns x frames), checked against the cap before reading."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        n = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "NumberOfFrames", 1) or 1)
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds on a bad file
        raise InputError(f"not a readable DICOM file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if n > max_voxels:
        raise InputError(f"its DICOM header claims {n:,} voxels, more than the {max_voxels:,} accepted")
    return n


MHA_DATA_RE = re.compile(rb"ElementDataFile\s*=\s*[^\r\n]*\r?\n")
MHA_CSIZE_RE = re.compile(rb"(?mi)^\s*CompressedDataSize\s*=\s*([^\r\n]*)$")


def _check_mha_compressed_size(path: str, name: str) -> None:
    """A compressed .mha whose CompressedDataSize is not the size of its data: SimpleITK then reads zeros
    (silently) while a stream reader reads the voxels, so the file means two things; refused (found by the
    fuzzer)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    m = MHA_DATA_RE.search(head)
    header = head[: m.start()] if m else head
    sizes = MHA_CSIZE_RE.findall(header)
    compressed = re.findall(rb"(?mi)^\s*CompressedData\s*=\s*(\S*)", header)
    if not m or not sizes or not compressed or compressed[-1].lower() != b"true":
        return
    actual = os.path.getsize(path) - m.end()
    for claimed in sizes:
        try:
            ok = int(claimed.strip()) == actual
        except ValueError:
            ok = False
        if not ok:
            raise InputError(f"{name}: CompressedDataSize says {claimed.strip().decode('latin-1')[:40]!r} bytes, "
                             f"the file holds {actual} bytes of data after its header")


def check_upload_file(path: str, ext: str, name: str, max_voxels: int = DEFAULT_MAX_VOXELS):
    """Cheap checks before an upload is read: header size cap, spacing, completeness (volumes) or the
    DICOM header cap. InputError (422) naming the upload; returns the volume facts (None for DICOM/zip)."""
    if ext not in UPLOAD_EXT:
        raise InputError(f"{name}: unsupported file type {ext or '(none)'!r}: upload a chest CT as "
                         f"{', '.join(UPLOAD_EXT)} (.zip: the DICOM files of one series)")
    try:
        if ext == ".dcm":
            _read_dicom_header(path)
            _check_dicom_file(path, max_voxels)
        elif ext != ".zip":
            facts = check_volume_file(path, name, max_voxels)
            if ext == ".mha":
                _check_mha_compressed_size(path, name)
            return facts
    except InputError as e:
        raise InputError(scrub(str(e), {path: name}) if name in str(e) else f"{name}: {scrub(str(e), {path: name})}") \
            from None
    return None


def load_upload(path: str, ext: str, name: str = "the uploaded file", max_voxels: int = DEFAULT_MAX_VOXELS,
                min_slices: int = MIN_SLICES) -> sitk.Image:
    """Read an uploaded file (NIfTI, NRRD, MHA, a DICOM file or a zip of one DICOM series) after
    :func:`check_upload_file`, and check that it is a chest CT volume in Hounsfield units with at least
    ``min_slices`` slices (a single 2D slice is refused: the server keeps whole scans). InputError (HTTP
    422) names the upload, never a server path."""
    facts = check_upload_file(path, ext, name, max_voxels)
    if facts is not None and facts.spatial_dims < 3:
        raise InputError(f"{name} is a 2D image ({' x '.join(map(str, facts.size))}): the server keeps whole CT "
                         f"volumes (at least {min_slices} axial slices); read single slices with `hybrid-ct predict`")
    tmp_dir = None
    try:
        if ext == ".zip":
            with tempfile.TemporaryDirectory(prefix=temp_prefix("dicom")) as tmp_dir:
                folder = _extract_dicom_zip(path, tmp_dir, 2 * max_voxels + (64 << 20))
                _check_series_geometry(folder)
                img = read_image(folder)
        else:
            img = read_image(path)
        if img.GetSize()[2] < min_slices:
            raise InputError(f"{img.GetSize()[2]} slice(s) of {img.GetSize()[0]} x {img.GetSize()[1]}: the server "
                             f"keeps whole CT volumes (at least {min_slices} axial slices); read single slices "
                             "with `hybrid-ct predict`")
        return check_ct(img, require_chest=True)
    except InputError as e:
        msg = scrub(str(e), {path: name, tmp_dir or "": name})
        msg = msg[len("image: "):] if msg.startswith("image: ") else msg
        raise InputError(msg if msg.startswith(name) else f"{name}: {msg}") from None


# ---------------------------------------------------------------------------------------- labels
def parse_label_info(label_info) -> dict:
    """label_info ``[{"name": .., "idx": ..}, ...]`` or ``{"name": idx}`` -> {value: original name}."""
    if label_info is None:
        return {}
    if isinstance(label_info, str):
        try:
            label_info = json.loads(label_info)
        except ValueError:
            raise BadRequest("label_info is not valid JSON") from None
    pairs = []
    if isinstance(label_info, dict):
        pairs = list(label_info.items())
    elif isinstance(label_info, list):
        for item in label_info:
            if not isinstance(item, dict) or "name" not in item:
                raise BadRequest(f"label_info entry {item!r} needs a 'name' and an 'idx'")
            idx = next((item[k] for k in ("idx", "value", "label", "id") if k in item), None)
            pairs.append((item["name"], idx))
    else:
        raise BadRequest("label_info must be a list of {\"name\", \"idx\"} or an object name -> value")
    out = {}
    for name, idx in pairs:
        if isinstance(idx, bool) or not isinstance(idx, (int, float, str)):
            raise BadRequest(f"label_info: value of {name!r} must be an integer, got {idx!r}")
        try:
            value = int(idx)
        except ValueError:
            raise BadRequest(f"label_info: value of {name!r} must be an integer, got {idx!r}") from None
        if value != float(idx) or value < 0:
            raise BadRequest(f"label_info: value of {name!r} must be a non-negative integer, got {idx!r}")
        if value in out and out[value] != name:
            raise BadRequest(f"label_info gives value {value} to both {out[value]!r} and {name!r}")
        out[value] = name
    return out


def _read_label_array(path: str, ref: sitk.ImageFileReader):
    try:
        lab = sitk.ReadImage(path)
    except RuntimeError as e:
        raise InputError(f"the label file cannot be read as an image: {str(e).strip().splitlines()[-1]}") from None
    if lab.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the label has {lab.GetNumberOfComponentsPerPixel()} components per voxel: "
                         "send one label map (0 background, then one value per segment)")
    if lab.GetDimension() == 4 and lab.GetSize()[3] == 1:
        lab = sitk.Extract(lab, list(lab.GetSize()[:3]) + [0], [0, 0, 0, 0])
    size = tuple(int(s) for s in ref.GetSize())
    if lab.GetDimension() != 3 or tuple(lab.GetSize()) != size:
        raise InputError(f"label shape {tuple(lab.GetSize())} does not match the image shape {size}: "
                         "the label must be drawn on the image's own voxel grid")
    sp_ok = np.allclose(lab.GetSpacing(), ref.GetSpacing(), rtol=1e-3, atol=1e-4)
    or_ok = np.allclose(lab.GetOrigin(), ref.GetOrigin(), atol=1e-2 * min(ref.GetSpacing()) + 1e-3)
    dir_ok = np.allclose(lab.GetDirection(), ref.GetDirection(), atol=1e-3)
    if not (sp_ok and or_ok and dir_ok):
        raise InputError(f"the label does not lie on the image grid: spacing {lab.GetSpacing()} vs "
                         f"{ref.GetSpacing()}, origin {lab.GetOrigin()} vs {ref.GetOrigin()}")
    arr = sitk.GetArrayFromImage(lab)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise InputError("the label holds non-integer values: send an integer label map")
    elif arr.dtype.kind not in "iub":
        raise InputError(f"unsupported label pixel type {lab.GetPixelIDTypeAsString()}")
    return arr


def image_header(path: str):
    """Geometry of an image without reading its pixels (a DICOM folder is read whole)."""
    if os.path.isdir(path):
        img = read_image(path)
        return img
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"the stored image {os.path.basename(path)} cannot be read: {e}") from None
    if r.GetDimension() == 4 and r.GetSize()[3] == 1:
        return _Header(r.GetSize()[:3], r.GetSpacing()[:3], r.GetOrigin()[:3],
                       tuple(np.array(r.GetDirection()).reshape(4, 4)[:3, :3].ravel()))
    return r


class _Header:
    def __init__(self, size, spacing, origin, direction):
        self._v = (tuple(size), tuple(spacing), tuple(origin), tuple(direction))

    def GetSize(self):  # noqa: N802 - SimpleITK naming
        return self._v[0]

    def GetSpacing(self):  # noqa: N802
        return self._v[1]

    def GetOrigin(self):  # noqa: N802
        return self._v[2]

    def GetDirection(self):  # noqa: N802
        return self._v[3]


def canonicalise_label(label_path: str, image_path: str, label_info=None, name: str = "the label"):
    """Read a submitted label map, check it against the image and remap it BY NAME to the project's
    convention (contract.json: 0 background, 1 lung without a side, 2 infection, 3 right lung, 4 left lung).

    Returns ``(uint8 SimpleITK image in the image's geometry, canonical label_info, warnings)``.
    Without ``label_info`` the values must already be the contract's. Values in the map that label_info does
    not name, or names the contract does not know, are refused (InputError, HTTP 422); an unknown name whose
    value does not occur in the map is only reported as a warning. A correction drawn as one lung ("lung",
    the labels of clients before the sides) is kept as lung without a side: it trains the lung head as the
    sided labels do.
    """
    ref = image_header(image_path)
    if volume_kind(label_path):  # whole and no bigger than the image, before a voxel is read
        try:
            check_volume_file(label_path, name, max_voxels=int(np.prod(ref.GetSize())))
        except InputError as e:
            raise InputError(scrub(str(e), {label_path: name})) from None
    arr = _read_label_array(label_path, ref)
    present = set(np.unique(arr).astype(np.int64).tolist())
    names = parse_label_info(label_info)
    warnings = []
    if not names:
        bad = sorted(present - set(LABELS.values()))
        if bad:
            allowed = ", ".join(f"{v} {n}" for n, v in sorted(LABELS.items(), key=lambda kv: kv[1]))
            raise InputError(f"the label holds unknown values {bad[:10]}: allowed are {allowed} "
                             "(or send label_info naming each value)")
        mapping = {v: v for v in present}
    else:
        mapping = {0: 0}
        unknown = []
        for value, name in names.items():
            canon = canonical_name(name)
            if canon is None:
                if value in present and value != 0:
                    unknown.append(f"{name!r} (value {value})")
                else:
                    warnings.append(f"segment {name!r} is not used by this model and is empty: ignored")
                continue
            mapping[value] = LABELS[canon]
        if unknown:
            raise InputError(f"the label names segments this model does not know: {', '.join(unknown)}; "
                             f"known are {', '.join(n.replace('_', ' ') for n in FOREGROUND)}")
        unnamed = sorted(present - set(mapping))
        if unnamed:
            raise InputError(f"the label holds values {unnamed[:10]} that label_info does not name "
                             f"(label_info names {sorted(names)})")
    uniq, inverse = np.unique(arr.astype(np.int64), return_inverse=True)
    out_arr = np.array([mapping[int(u)] for u in uniq], dtype=np.uint8)[inverse].reshape(arr.shape)
    out = sitk.GetImageFromArray(out_arr)
    out.SetSpacing(tuple(ref.GetSpacing()))
    out.SetOrigin(tuple(ref.GetOrigin()))
    out.SetDirection(tuple(ref.GetDirection()))
    canon_info = [{"name": name, "idx": value} for name, value in FOREGROUND.items()]
    return out, canon_info, warnings
