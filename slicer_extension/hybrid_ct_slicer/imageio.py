"""Minimal image files with numpy + standard library: NRRD and NIfTI-1, read and write.

Enough to send a corrected label map (or a test volume) to the server from a Python that has no
SimpleITK/nibabel (Slicer's own Python has ITK inside, but this keeps one code path everywhere).

Arrays are indexed ``[k, j, i]`` (slice, row, column) like ``slicer.util.arrayFromVolume`` and
``SimpleITK.GetArrayFromImage``. Geometry is in ITK/DICOM LPS convention: ``direction`` is a
row-major 3x3 whose COLUMNS are the i, j, k axis directions, ``origin`` the LPS position of voxel
(0, 0, 0), ``spacing`` per i, j, k in mm.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
from dataclasses import dataclass

import numpy as np

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "spacing", tuple(float(x) for x in self.spacing))
        object.__setattr__(self, "origin", tuple(float(x) for x in self.origin))
        d = np.asarray(self.direction, dtype=float).reshape(-1)
        if d.size != 9:
            raise ValueError("direction must have 9 values (row-major 3x3)")
        object.__setattr__(self, "direction", tuple(d.tolist()))
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("spacing and origin must have 3 values")
        if any(not (s > 0) for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        m = self.ijk_to_lps()
        m[:3, :] = _LPS_FROM_RAS @ m[:3, :]
        return m

    @classmethod
    def from_ijk_to_ras(cls, matrix) -> "Geometry":
        """From a 4x4 IJK-to-RAS matrix (what a Slicer volume node holds)."""
        m = np.asarray(matrix, dtype=float).reshape(4, 4)
        lps = _LPS_FROM_RAS @ m[:3, :]
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        return cls(tuple(spacing), tuple(lps[:3, 3]), tuple(direction.reshape(-1)))

    def almost_equal(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol)
                and np.allclose(self.direction, other.direction, atol=tol))


# ------------------------------------------------------------------------------------ NRRD
_NRRD_TYPES = {
    np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8", np.dtype(np.int16): "int16",
    np.dtype(np.uint16): "uint16", np.dtype(np.int32): "int32", np.dtype(np.uint32): "uint32",
    np.dtype(np.int64): "int64", np.dtype(np.uint64): "uint64", np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
_NRRD_TYPE_ALIASES = {
    "signed char": "int8", "int8_t": "int8", "uchar": "uint8", "unsigned char": "uint8", "uint8_t": "uint8",
    "short": "int16", "short int": "int16", "signed short": "int16", "signed short int": "int16",
    "int16_t": "int16", "ushort": "uint16", "unsigned short": "uint16", "unsigned short int": "uint16",
    "uint16_t": "uint16", "int": "int32", "signed int": "int32", "int32_t": "int32", "uint": "uint32",
    "unsigned int": "uint32", "uint32_t": "uint32", "longlong": "int64", "long long": "int64",
    "int64_t": "int64", "ulonglong": "uint64", "unsigned long long": "uint64", "uint64_t": "uint64",
    "float": "float32", "double": "float64",
}


def _fmt(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"


def write_nrrd(path: str, array: np.ndarray, geometry: Geometry = Geometry(), *, compress: bool = True) -> str:
    """Write a 3-D array ``[k, j, i]`` as NRRD (LPS space), gzip-encoded by default."""
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"write_nrrd expects a 3-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype not in _NRRD_TYPES:
        raise ValueError(f"unsupported dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    m = geometry.ijk_to_lps()
    dirs = " ".join("(" + ",".join(_fmt(v) for v in m[:3, c]) + ")" for c in range(3))
    header = (
        "NRRD0004\n"
        "# written by hybrid_ct_slicer\n"
        f"type: {_NRRD_TYPES[arr.dtype]}\n"
        "dimension: 3\n"
        "space: left-posterior-superior\n"
        f"sizes: {arr.shape[2]} {arr.shape[1]} {arr.shape[0]}\n"
        f"space directions: {dirs}\n"
        "kinds: domain domain domain\n"
        f"endian: little\n"
        f"encoding: {'gzip' if compress else 'raw'}\n"
        f"space origin: ({','.join(_fmt(v) for v in geometry.origin)})\n\n"
    )
    data = arr.tobytes(order="C")
    if compress:
        data = gzip.compress(data, compresslevel=1)
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(data)
    return path


def _vectors(text: str) -> list[list[float] | None]:
    out: list[list[float] | None] = []
    for tok in re.findall(r"\([^)]*\)|none", text):
        if tok == "none":
            out.append(None)
        else:
            out.append([float(v) for v in tok.strip("()").split(",")])
    return out


def read_nrrd(path: str) -> tuple[np.ndarray, Geometry]:
    """Read a 3-D scalar NRRD (attached data, raw or gzip) -> (array ``[k, j, i]``, LPS geometry)."""
    with open(path, "rb") as f:
        blob = f.read()
    if not blob.startswith(b"NRRD"):
        raise ValueError(f"{path} is not a NRRD file")
    end = blob.find(b"\n\n")
    if end < 0:
        raise ValueError(f"{path}: NRRD header not terminated")
    fields: dict[str, str] = {}
    for line in blob[:end].decode("latin-1").splitlines()[1:]:
        if not line or line.startswith("#") or ":=" in line:
            continue
        key, _, value = line.partition(": ")
        fields[key.strip().lower()] = value.strip()
    if int(fields.get("dimension", "0")) != 3:
        raise ValueError(f"{path}: only 3-D scalar NRRD files are supported")
    nx, ny, nz = (int(v) for v in fields["sizes"].split())
    t = fields["type"].lower()
    dtype = np.dtype(_NRRD_TYPE_ALIASES.get(t, t))
    endian = fields.get("endian", "little")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    data = blob[end + 2:]
    enc = fields.get("encoding", "raw").lower()
    if enc in ("gzip", "gz"):
        data = gzip.decompress(data)
    elif enc != "raw":
        raise ValueError(f"{path}: unsupported NRRD encoding {enc!r}")
    arr = np.frombuffer(data, dtype=dtype, count=nx * ny * nz).reshape(nz, ny, nx).astype(dtype.newbyteorder("="))
    space = fields.get("space", "left-posterior-superior").lower()
    dirs = _vectors(fields.get("space directions", "(1,0,0) (0,1,0) (0,0,1)"))
    m = np.array([d for d in dirs if d is not None], dtype=float).T  # columns = axes
    origin = np.array(_vectors(fields.get("space origin", "(0,0,0)"))[0], dtype=float)
    if space in ("right-anterior-superior", "ras"):
        m = _LPS_FROM_RAS @ m
        origin = _LPS_FROM_RAS @ origin
    elif space not in ("left-posterior-superior", "lps"):
        raise ValueError(f"{path}: unsupported NRRD space {space!r}")
    spacing = np.linalg.norm(m, axis=0)
    return arr, Geometry(tuple(spacing), tuple(origin), tuple((m / spacing).reshape(-1)))


# ------------------------------------------------------------------------------------ NIfTI-1
_NIFTI_TYPES = {
    np.dtype(np.uint8): (2, 8), np.dtype(np.int16): (4, 16), np.dtype(np.int32): (8, 32),
    np.dtype(np.float32): (16, 32), np.dtype(np.float64): (64, 64), np.dtype(np.int8): (256, 8),
    np.dtype(np.uint16): (512, 16), np.dtype(np.uint32): (768, 32), np.dtype(np.int64): (1024, 64),
    np.dtype(np.uint64): (1280, 64),
}
_NIFTI_HEADER = struct.Struct("<i10s18sihbb8h3fhhhh8ffffhbbffffii80s24shh6f4f4f4f16s4s")


def _quaternion(r: np.ndarray) -> tuple[float, float, float, float]:
    """Rotation matrix (det +1) -> NIfTI (b, c, d) and qfac handled by the caller."""
    r11, r12, r13 = r[0]
    r21, r22, r23 = r[1]
    r31, r32, r33 = r[2]
    a = r11 + r22 + r33 + 1.0
    if a > 0.5:
        a = 0.5 * math.sqrt(a)
        b, c, d = 0.25 * (r32 - r23) / a, 0.25 * (r13 - r31) / a, 0.25 * (r21 - r12) / a
    else:
        xd, yd, zd = 1.0 + r11 - (r22 + r33), 1.0 + r22 - (r11 + r33), 1.0 + r33 - (r11 + r22)
        if xd > 1.0:
            b = 0.5 * math.sqrt(xd)
            c, d, a = 0.25 * (r12 + r21) / b, 0.25 * (r13 + r31) / b, 0.25 * (r32 - r23) / b
        elif yd > 1.0:
            c = 0.5 * math.sqrt(yd)
            b, d, a = 0.25 * (r12 + r21) / c, 0.25 * (r23 + r32) / c, 0.25 * (r13 - r31) / c
        else:
            d = 0.5 * math.sqrt(zd)
            b, c, a = 0.25 * (r13 + r31) / d, 0.25 * (r23 + r32) / d, 0.25 * (r21 - r12) / d
        if a < 0.0:
            a, b, c, d = -a, -b, -c, -d
    return a, b, c, d


def write_nifti(path: str, array: np.ndarray, geometry: Geometry = Geometry()) -> str:
    """Write a 3-D array ``[k, j, i]`` as NIfTI-1 (``.nii`` or ``.nii.gz``) with qform and sform."""
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"write_nifti expects a 3-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.newbyteorder("=") not in _NIFTI_TYPES:
        raise ValueError(f"unsupported dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    code, bitpix = _NIFTI_TYPES[arr.dtype.newbyteorder("=")]
    ras = geometry.ijk_to_ras()
    spacing = np.asarray(geometry.spacing)
    rot = ras[:3, :3] / spacing
    qfac = 1.0
    if np.linalg.det(rot) < 0:
        qfac = -1.0
        rot = rot.copy()
        rot[:, 2] *= -1
    _, qb, qc, qd = _quaternion(rot)
    nz, ny, nx = arr.shape
    dim = (3, nx, ny, nz, 1, 1, 1, 1)
    pixdim = (qfac, *spacing.tolist(), 0.0, 0.0, 0.0, 0.0)
    if arr.dtype.kind in "ui":
        glmax, glmin = int(min(arr.max(initial=0), 2**31 - 1)), int(max(arr.min(initial=0), -2**31))
    else:
        glmax = glmin = 0
    header = _NIFTI_HEADER.pack(
        348, b"", b"", 0, 0, ord("r"), 0, *dim, 0.0, 0.0, 0.0, 0, code, bitpix, 0, *pixdim,
        352.0, 1.0, 0.0, 0, 0, 2, 0.0, 0.0, 0.0, 0.0, glmax, glmin, b"hybrid_ct_slicer", b"", 1, 1,
        qb, qc, qd, *ras[:3, 3].tolist(), *ras[0].tolist(), *ras[1].tolist(), *ras[2].tolist(), b"", b"n+1\0",
    )
    payload = header + b"\0\0\0\0" + arr.tobytes(order="C")
    if path.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1)
    with open(path, "wb") as f:
        f.write(payload)
    return path


_NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8,
                 512: np.uint16, 768: np.uint32, 1024: np.int64, 1280: np.uint64}


def _quatern_to_matrix(b: float, c: float, d: float) -> np.ndarray:
    a = 1.0 - (b * b + c * c + d * d)
    a = math.sqrt(a) if a > 1e-7 else 0.0
    if a == 0.0:  # 180 degree rotation: renormalise (b, c, d)
        n = math.sqrt(b * b + c * c + d * d) or 1.0
        b, c, d = b / n, c / n, d / n
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])


def read_nifti(path: str) -> tuple[np.ndarray, Geometry]:
    """Read a 3-D NIfTI-1 file (``.nii``/``.nii.gz``) -> (array ``[k, j, i]``, LPS geometry).

    Uses the sform when set, else the qform, else the voxel sizes; scaling (scl_slope) is applied
    only when it is not the identity (label maps are stored unscaled).
    """
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    if len(blob) < 348:
        raise ValueError(f"{path} is too short to be a NIfTI file")
    endian = "<"
    if struct.unpack("<i", blob[:4])[0] != 348:
        if struct.unpack(">i", blob[:4])[0] != 348:
            raise ValueError(f"{path} is not a NIfTI-1 file")
        endian = ">"
    h = struct.Struct(endian + _NIFTI_HEADER.format[1:]).unpack(blob[:348])
    # field indices of _NIFTI_HEADER: 7-14 dim, 19 datatype, 22-29 pixdim, 30 vox_offset,
    # 31 scl_slope, 32 scl_inter, 44 qform_code, 45 sform_code, 46-48 quatern_bcd, 49-51 qoffset, 52-63 srow
    dim = h[7:15]
    datatype = h[19]
    pixdim = h[22:30]
    vox_offset, slope, inter = h[30], h[31], h[32]
    qform_code, sform_code = h[44], h[45]
    qb, qc, qd, qx, qy, qz = h[46:52]
    srow = np.array(h[52:64], dtype=float).reshape(3, 4)
    if blob[344:347] not in (b"n+1", b"ni1"):
        raise ValueError(f"{path}: bad NIfTI magic")
    ndim = dim[0]
    if ndim < 2 or any(d > 1 for d in dim[4:ndim + 1]):
        raise ValueError(f"{path}: only 3-D NIfTI images are supported (dim = {dim[:ndim + 1]})")
    nx, ny, nz = dim[1], dim[2], (dim[3] if ndim >= 3 else 1)
    if datatype not in _NIFTI_DTYPES:
        raise ValueError(f"{path}: unsupported NIfTI datatype {datatype}")
    dtype = np.dtype(_NIFTI_DTYPES[datatype]).newbyteorder(endian)
    start = int(vox_offset) if vox_offset >= 348 else 352
    arr = np.frombuffer(blob, dtype=dtype, count=nx * ny * nz, offset=start).reshape(nz, ny, nx)
    arr = arr.astype(dtype.newbyteorder("="))
    if slope not in (0.0, 1.0) or (slope != 0.0 and inter != 0.0):
        arr = arr * slope + inter
    spacing = np.abs(np.array(pixdim[1:4], dtype=float))
    spacing[spacing == 0] = 1.0
    if sform_code > 0:
        m = srow[:, :3]
        origin_ras = srow[:, 3]
        spacing = np.linalg.norm(m, axis=0)
        rot = m / spacing
    elif qform_code > 0:
        rot = _quatern_to_matrix(qb, qc, qd)
        if pixdim[0] < 0:
            rot[:, 2] *= -1
        origin_ras = np.array([qx, qy, qz], dtype=float)
    else:
        rot = np.eye(3)
        origin_ras = np.zeros(3)
    direction = _LPS_FROM_RAS @ rot
    origin = _LPS_FROM_RAS @ origin_ras
    return arr, Geometry(tuple(spacing), tuple(origin), tuple(direction.reshape(-1)))


def read_image(path: str) -> tuple[np.ndarray, Geometry]:
    """Read by extension: ``.nii``/``.nii.gz`` or ``.nrrd``."""
    lower = path.lower()
    if lower.endswith(".nii") or lower.endswith(".nii.gz"):
        return read_nifti(path)
    if lower.endswith(".nrrd"):
        return read_nrrd(path)
    raise ValueError(f"unsupported file type for {path!r}: expected .nii.gz, .nii or .nrrd")


def write_image(path: str, array: np.ndarray, geometry: Geometry = Geometry()) -> str:
    """Write by extension: ``.nii``/``.nii.gz`` (NIfTI-1) or ``.nrrd``."""
    lower = path.lower()
    if lower.endswith(".nii") or lower.endswith(".nii.gz"):
        return write_nifti(path, array, geometry)
    if lower.endswith(".nrrd"):
        return write_nrrd(path, array, geometry)
    raise ValueError(f"unsupported file type for {path!r}: use .nii.gz, .nii or .nrrd")
