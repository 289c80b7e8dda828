"""Check that a volume file is whole and sane BEFORE any pixel is read (NIfTI, NRRD, MHA).

SimpleITK reads a truncated ``.nii.gz`` without complaint (the missing slices come back as zeros), reads
a NIfTI voxel spacing of 0 as 1 mm, follows a detached NRRD ``data file`` / MHA ``ElementDataFile`` to
any path on the machine, and allocates whatever size a 65-byte header claims. So every uploaded file
goes through :func:`check_volume_file` first: the header is parsed here, the claimed size is checked
against a cap before anything is allocated, the whole (compressed) stream is read once to check that it
holds every voxel the header promises (gzip CRC and length included), and spacing must be finite and
positive. Errors are ``InputError`` naming the file by the name the caller gives (never a temp path).
"""
from __future__ import annotations

import bz2
import gzip
import io
import math
import os
import re
import zlib
from dataclasses import dataclass

import numpy as np

from hybrid_ct.errors import InputError

# 1.5 x a real 512 x 512 x 600 chest CT: a bigger claim is refused before anything is allocated.
DEFAULT_MAX_VOXELS = 512 * 512 * 900
CHUNK = 1 << 20
SLACK = 1 << 20  # trailing bytes tolerated after the voxel data (padding); more is not this image

_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


@dataclass
class VolumeFacts:
    size: tuple  # voxels per axis as the header gives them (x, y[, z[, t]])
    spacing: tuple  # spatial spacing of those axes
    bytes_per_voxel: int

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.size, dtype=np.int64))

    @property
    def spatial_dims(self) -> int:
        return sum(1 for s in self.size[:3] if s > 1) if len(self.size) >= 3 else len(self.size)


def volume_kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith((".nii", ".nii.gz")):
        return "nifti"
    if low.endswith(".nrrd"):
        return "nrrd"
    if low.endswith(".mha"):
        return "mha"
    return None


def check_volume_file(path: str, name: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS) -> VolumeFacts:
    """Parse the header of ``path``, check size cap, spacing and completeness; return what it claims.

    ``name`` is how messages call the file (e.g. the client's file name); the extension of ``name`` or
    of ``path`` tells the format."""
    name = name or os.path.basename(path)
    kind = volume_kind(path) or volume_kind(name)
    if kind is None:
        raise InputError(f"{name}: not a NIfTI, NRRD or MHA file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{name} is empty (0 bytes)")
    # file_offset: where the (compressed) data stream starts; skip: stream bytes before the voxels
    facts, file_offset, codec, skip = {"nifti": _nifti, "nrrd": _nrrd, "mha": _mha}[kind](path, name)
    _check_claim(facts, name, max_voxels)
    need = facts.n_voxels * facts.bytes_per_voxel
    got = _data_bytes(path, file_offset, codec, need + skip, name) - skip
    if got < need:
        raise InputError(f"{name} is truncated: its header describes {_shape(facts)} voxels "
                         f"({need} bytes of data) but the file holds only {got} bytes of them")
    return facts


def _shape(facts: VolumeFacts) -> str:
    return " x ".join(str(s) for s in facts.size)


def _check_claim(facts: VolumeFacts, name: str, max_voxels: int) -> None:
    if any(s < 1 for s in facts.size):
        raise InputError(f"{name}: its header gives a size of {_shape(facts)} voxels (a zero or negative axis)")
    if facts.n_voxels > max_voxels:
        raise InputError(f"{name}: its header claims {_shape(facts)} = {facts.n_voxels:,} voxels, more than the "
                         f"{max_voxels:,} accepted here")
    for s in facts.spacing:
        if not (math.isfinite(s) and s > 0):
            raise InputError(f"{name}: broken geometry, voxel spacing {tuple(facts.spacing)} must be finite and "
                             "positive (a spacing of 0 would be read as 1 mm)")


def _data_bytes(path: str, offset: int, codec: str, need: int, name: str) -> int:
    """Bytes of voxel data the file really holds from ``offset`` on (decompressed fully, CRC checked)."""
    if codec == "raw":
        return max(0, os.path.getsize(path) - offset)
    limit = need + SLACK
    got = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            if codec == "gzip":
                stream = gzip.GzipFile(fileobj=raw)
                read = stream.read
            elif codec == "bzip2":
                read = bz2.BZ2File(raw).read
            else:  # zlib or gzip stream (MetaIO writes zlib)
                d = zlib.decompressobj(zlib.MAX_WBITS | 32)

                def read(n, _raw=raw, _d=d):
                    while True:
                        if _d.unconsumed_tail:
                            return _d.decompress(_d.unconsumed_tail, n)
                        block = _raw.read(CHUNK)
                        if not block:
                            if not _d.eof:
                                raise EOFError("compressed stream ended before its end marker")
                            return b""
                        out = _d.decompress(block, n)
                        if out or _d.eof:
                            return out
            while True:
                block = read(CHUNK)
                if not block:
                    break
                got += len(block)
                if got > limit:
                    raise InputError(f"{name} holds more data than its header describes ({need} bytes): "
                                     "not one image of that size")
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(f"{name} is truncated or corrupt: its compressed data cannot be read to the end "
                         f"({_reason(e)})") from None
    return got


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.replace("Compressed file ended before the end-of-stream marker was reached",
                        "the file ends before the end of its compressed stream")


# ------------------------------------------------------------------------------------------- formats
def _nifti(path: str, name: str):
    import nibabel as nib

    gz = _is_gzip(path)
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            block = f.read(540)
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(f"{name} is truncated or corrupt: its header cannot be read ({_reason(e)})") from None
    try:
        # the raw header, unchecked: nib.load would silently turn a pixdim of 0 into 1
        two = int.from_bytes(block[:4], "little") == 540 or int.from_bytes(block[:4], "big") == 540
        hdr = (nib.Nifti2Header if two else nib.Nifti1Header).from_fileobj(io.BytesIO(block), check=False)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        offset = int(hdr["vox_offset"])
        pixdim = [float(v) for v in hdr["pixdim"][1: 1 + len(shape)]]
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds on a bad header
        raise InputError(f"cannot read {name} as a NIfTI file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if not shape or bytes(hdr["magic"]).rstrip(b"\0") not in (b"n+1", b"ni1", b"n+2", b"ni2"):
        raise InputError(f"cannot read {name} as a NIfTI file (no NIfTI magic in its header)")
    facts = VolumeFacts(shape, tuple(pixdim[: min(3, len(shape))]), dtype.itemsize)
    return (facts, 0, "gzip", offset) if gz else (facts, offset, "raw", 0)


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_header(path: str, name: str, end: re.Pattern, limit: int = 1 << 16):
    with open(path, "rb") as f:
        head = f.read(limit)
    m = end.search(head)
    if not m:
        raise InputError(f"{name}: no complete header in its first {limit // 1024} KiB")
    return head[: m.start()].decode("latin-1"), m.end()


def _numbers(text: str, name: str, key: str, kind=float) -> list:
    try:
        return [kind(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"{name}: unreadable {key} {text!r} in its header") from None


def _nrrd(path: str, name: str):
    text, offset = _read_header(path, name, re.compile(rb"\r?\n\r?\n"))
    if not text.startswith("NRRD000"):
        raise InputError(f"cannot read {name} as a NRRD file (no 'NRRD000x' magic line)")
    fields = {}
    for line in text.splitlines()[1:]:
        if line.startswith("#") or ":=" in line or ":" not in line:
            continue
        k, v = line.split(":", 1)
        fields[k.strip().lower()] = v.strip()
    if "data file" in fields or "datafile" in fields:
        raise InputError(f"{name} names a separate data file ({fields.get('data file') or fields.get('datafile')!r}): "
                         "upload a single-file .nrrd with the voxels inside")
    sizes = _numbers(fields.get("sizes", ""), name, "sizes", int)
    typ = fields.get("type", "").lower()
    bpp = next((n for n, names in _NRRD_TYPES.items() if typ in names), None)
    if not sizes or bpp is None:
        raise InputError(f"{name}: NRRD header without usable 'sizes' / 'type' ({fields.get('sizes')!r}, {typ!r})")
    spacing = []
    if "space directions" in fields:
        for vec in re.findall(r"\(([^)]*)\)|none", fields["space directions"]):
            if vec:
                spacing.append(float(np.linalg.norm(_numbers(vec, name, "space directions"))))
    elif "spacings" in fields:
        spacing = [v for v in _numbers(fields["spacings"].replace("nan", " "), name, "spacings")]
    encoding = fields.get("encoding", "raw").lower()
    codec = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(encoding)
    if codec is None:
        raise InputError(f"{name}: NRRD encoding {encoding!r} is not accepted: use raw or gzip")
    return VolumeFacts(tuple(sizes), tuple(spacing[:3]), bpp), offset, codec, 0


def _mha(path: str, name: str):
    text, offset = _read_header(path, name, re.compile(rb"ElementDataFile\s*=\s*[^\r\n]*\r?\n"))
    fields = {}
    with open(path, "rb") as f:
        last = f.read(offset)[len(text):].decode("latin-1")
    for line in (text + last).splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            fields[k.strip().lower()] = v.strip()
    if fields.get("elementdatafile", "").upper() != "LOCAL":
        raise InputError(f"{name} names a separate data file ({fields.get('elementdatafile')!r}): "
                         "upload a single-file .mha (ElementDataFile = LOCAL)")
    sizes = _numbers(fields.get("dimsize", ""), name, "DimSize", int)
    bpp = _MET_BYTES.get(fields.get("elementtype", "").upper())
    if not sizes or bpp is None:
        raise InputError(f"{name}: MHA header without usable DimSize / ElementType")
    bpp *= int(fields.get("elementnumberofchannels", "1") or 1)
    spacing = _numbers(fields.get("elementspacing", fields.get("elementsize", "")), name, "ElementSpacing")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    return VolumeFacts(tuple(sizes), tuple(spacing[:3]), bpp), offset, "zlib" if compressed else "raw", 0
