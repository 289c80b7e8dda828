"""Label and volume files through SimpleITK (shipped with Slicer; the server reads them with ITK too).

Arrays are indexed ``[k, j, i]`` (slice, row, column) like ``slicer.util.arrayFromVolume`` and
``SimpleITK.GetArrayFromImage``. :class:`Geometry` is ITK's (LPS): ``direction`` is a row-major 3x3
whose COLUMNS are the i, j, k axis directions, ``origin`` the LPS position of voxel (0, 0, 0),
``spacing`` per i, j, k in mm; Slicer's volume nodes hold the same as an IJK-to-RAS matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "spacing", tuple(float(x) for x in self.spacing))
        object.__setattr__(self, "origin", tuple(float(x) for x in self.origin))
        object.__setattr__(self, "direction", tuple(float(x) for x in np.asarray(self.direction).reshape(-1)))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("spacing and origin need 3 values, direction 9 (row-major 3x3)")
        if any(not (s > 0) for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = np.reshape(self.direction, (3, 3)) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        m = self.ijk_to_lps()
        m[:3, :] = _LPS_FROM_RAS @ m[:3, :]
        return m

    @classmethod
    def from_ijk_to_ras(cls, matrix) -> "Geometry":
        """From a 4x4 IJK-to-RAS matrix (what a Slicer volume node holds)."""
        lps = _LPS_FROM_RAS @ np.asarray(matrix, dtype=float).reshape(4, 4)[:3, :]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        return cls(tuple(spacing), tuple(lps[:, 3]), tuple((lps[:, :3] / spacing).reshape(-1)))

    @classmethod
    def of_image(cls, image: sitk.Image) -> "Geometry":
        return cls(image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def almost_equal(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return all(np.allclose(a, b, atol=tol) for a, b in zip((self.spacing, self.origin, self.direction),
                                                               (other.spacing, other.origin, other.direction)))


def read_image(path: str) -> tuple[np.ndarray, Geometry]:
    """Any file ITK reads (``.nii.gz``, ``.nrrd``, ...) -> (array ``[k, j, i]``, LPS geometry)."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), Geometry.of_image(image)


def write_image(path: str, array: np.ndarray, geometry: Geometry = Geometry()) -> str:
    """Write a 3-D array ``[k, j, i]`` with its LPS geometry; the extension picks the format (compressed)."""
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"write_image expects a 3-D array, got shape {arr.shape}")
    image = sitk.GetImageFromArray(arr.astype(np.uint8) if arr.dtype == np.bool_ else arr)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(path), useCompression=True)
    return str(path)
