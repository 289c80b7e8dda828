"""Reading and checking CT images: always a 3D float32 SimpleITK image in Hounsfield units.

Every bad input raises ``hybrid_ct.errors.InputError`` with a message that names the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hybrid_ct.contract import LABELS
from hybrid_ct.errors import InputError
from hybrid_ct.imaging.calibration import calibrate_8bit, lung_window_hu

INTENSITIES = ("hu", "8bit", "8bit-auto")
PICTURE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXT = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_VALUES = tuple(sorted(LABELS.values()))  # contract.json
if LABEL_VALUES != tuple(range(len(LABEL_VALUES))):  # read_label checks a range
    raise ValueError(f"contract.json label values must be 0..n without gaps, got {LABEL_VALUES}")


_COMPLEX_TYPES = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)


def _ext(path: str) -> str:
    low = path.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else os.path.splitext(low)[1]


def _sitk_read(path: str, what: str = "image") -> sitk.Image:
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        detail = next((ln for ln in msg if "ERROR" in ln or "spacing" in ln.lower()), msg[-1] if msg else "")
        if "spacing" in str(e).lower():
            raise InputError(f"broken geometry in {path}: zero or negative voxel spacing ({detail.strip()})") from e
        raise InputError(f"cannot read {path} as an {what}: not a readable image file ({detail.strip()})") from e


def _nifti_nonfinite(path: str) -> int:
    """Count NaN / inf voxels in a float NIfTI (SimpleITK's reader silently turns NaN into 0)."""
    import nibabel as nib

    try:
        nii = nib.load(path)
        if np.dtype(nii.get_data_dtype()).kind not in "fc":
            return 0
        data = np.asanyarray(nii.dataobj)
    except Exception:  # noqa: BLE001 - SimpleITK already read it; nibabel is only a second look
        return 0
    return int(data.size - np.isfinite(data).sum())


def series_files(folder: str) -> list:
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    except RuntimeError as e:
        raise InputError(f"cannot scan {folder} for DICOM series: {e}") from e
    if not ids:
        raise InputError(f"no DICOM series found in folder {folder}")
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, i) for i in ids]
    if len(series) > 1:  # never pick one silently: say which series the folder mixes
        raise InputError(f"folder {folder} holds {len(series)} DICOM series, not one: "
                         + "; ".join(f"{uid} ({_series_label(files[0])}, {len(files)} file(s))"
                                     for uid, files in zip(ids, series))
                         + ". Put each series in its own folder, or run `hybrid-ct predict` on the folder "
                           "(one case per series)")
    return series[0]


def _series_label(path: str) -> str:
    """'CT "Chest 1.25 mm" #3' from a DICOM header (for messages)."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - only a label for a message
        return "header unreadable"
    parts = [str(ds.get("Modality", "") or "?"), f'"{ds.get("SeriesDescription", "") or ""}"']
    if ds.get("SeriesNumber", None) not in (None, ""):
        parts.append(f"#{ds.SeriesNumber}")
    return " ".join(parts)


def _check_modality(path: str) -> None:
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"cannot read the DICOM header of {path}: {e}") from e
    if r.HasMetaDataKey("0008|0060"):
        modality = r.GetMetaData("0008|0060").strip().upper()
        if modality and modality != "CT":
            raise InputError(f"{path} is a DICOM of modality {modality!r}, not CT")


def _read_dicom_folder(folder: str) -> sitk.Image:
    return _read_dicom_files(series_files(folder), folder)


def _read_dicom_files(files: list, folder: str) -> sitk.Image:
    """The files of one DICOM series, in slice order, as one volume."""
    _check_modality(files[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)  # GDCM applies rescale slope / intercept
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise InputError(f"cannot read the DICOM series in {folder} ({len(files)} files): {e}") from e


def _read_npy(path: str) -> sitk.Image:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds for a corrupt file
        raise InputError(f"cannot read {path} as a .npy array: {e}") from e
    if arr.dtype == bool or arr.dtype.kind in "cOUSV":
        raise InputError(f"unsupported pixel type {arr.dtype} in {path}: need a real-valued grey image")
    if arr.ndim not in (2, 3):
        raise InputError(f"{path} holds a {arr.ndim}D array {arr.shape}: need a 2D slice or a 3D volume")
    return sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))


def _read_picture(path: str) -> sitk.Image:
    """PNG/JPG/BMP/TIFF slice (RGB, palette or alpha pictures keep their luminance); spacing 1 mm."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as pic:
            pic.load()
            if pic.mode not in ("L", "I", "I;16", "I;16B", "F"):
                pic = pic.convert("L")
            arr = np.asarray(pic, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read {path} as a picture: {e}") from e
    if arr.ndim != 2:
        raise InputError(f"{path}: picture of shape {arr.shape}, need a single grey slice")
    return sitk.GetImageFromArray(arr)


def _as_3d(img: sitk.Image, path: str) -> sitk.Image:
    dim = img.GetDimension()
    if dim == 2:
        return sitk.JoinSeries(img)
    if dim == 4:
        size = img.GetSize()
        if size[3] == 1:
            return sitk.Extract(img, list(size[:3]) + [0], [0, 0, 0, 0])
        raise InputError(f"{path} is a 4D image {size}: need a single 3D CT volume")
    if dim != 3:
        raise InputError(f"{path} is a {dim}D image: need 2D or 3D")
    return img


def read_image(path, intensity: str = "hu") -> sitk.Image:
    """Read a CT as a 3D float32 image in HU (NIfTI, NRRD/MHA, DICOM folder or file, PNG/JPG/NPY slice).

    A DICOM folder must hold one series (several: InputError naming them; ``hybrid-ct predict`` runs
    each); a list of files is read as one DICOM series in the order given.

    ``intensity="8bit"`` is for pictures already windowed to 0..255 with the lung window: they are
    mapped linearly onto ``EXPORT_WINDOW_HU`` so that windowing gives back v / 255. ``"8bit-auto"`` is for
    pictures of unknown window (papers, other viewers): each slice is calibrated on its own anatomy
    (``calibrate_8bit``), falling back to ``"8bit"`` on an almost uniform picture. Structural problems
    (unreadable, empty, NaN, unsupported pixel type, broken geometry) raise InputError; see ``check_ct``
    for the rest.
    """
    if intensity not in INTENSITIES:
        raise InputError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    files = [os.fspath(f) for f in path] if isinstance(path, (list, tuple)) and path else None
    if files is not None:  # the files of one DICOM series, in slice order (hybrid_ct.predict.batch: a case per series)
        path = os.path.commonpath([os.path.dirname(f) or "." for f in files])
    elif not isinstance(path, (str, os.PathLike)):
        raise InputError(f"expected a file or folder path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"no such file or folder: {path}")
    if files is not None:
        img = _read_dicom_files(files, path)
    elif os.path.isdir(path):
        img = _read_dicom_folder(path)
    else:
        if os.path.getsize(path) == 0:
            raise InputError(f"empty file (0 bytes): {path}")
        ext = _ext(path)
        if ext == ".npy":
            img = _read_npy(path)
        elif ext in PICTURE_EXT:
            img = _read_picture(path)
        else:
            img = _sitk_read(path)
            bad = _nifti_nonfinite(path) if ext in (".nii", ".nii.gz") else 0
            if bad:
                raise InputError(f"{path}: {bad} voxels are NaN or infinite")
            if ext not in VOLUME_EXT:
                _check_modality(path)  # a DICOM file (or another format SimpleITK knows)
        img = _as_3d(img, path)
    check_pixels(img, path)
    if intensity in ("8bit", "8bit-auto"):
        img = _from_8bit(img, path, calibrate=intensity == "8bit-auto")
    img = sitk.Cast(img, sitk.sitkFloat32)
    check_values(img, path)
    check_geometry(img, path)
    return img


def _from_8bit(img: sitk.Image, where: str, calibrate: bool = False) -> sitk.Image:
    a = sitk.GetArrayViewFromImage(img)
    if a.size and (float(a.min()) < 0 or float(a.max()) > 255):
        raise InputError(f"{where} is not an 8-bit image (values {a.min():g}..{a.max():g}); "
                         "use intensity='hu' for Hounsfield units")
    a = np.asarray(a, np.float32)
    hu = (calibrate_8bit(a) if calibrate else lung_window_hu(a)).reshape(a.shape)
    out = sitk.GetImageFromArray(hu.astype(np.float32))
    out.CopyInformation(img)
    return out





def check_pixels(img, where: str) -> None:
    if not isinstance(img, sitk.Image):
        raise InputError(f"{where}: not an image (got {type(img).__name__}, need a SimpleITK image)")
    if img.GetNumberOfPixels() == 0:
        raise InputError(f"{where}: empty image (0 voxels, size {img.GetSize()})")
    if img.GetPixelID() in _COMPLEX_TYPES:
        raise InputError(f"{where}: unsupported pixel type {img.GetPixelIDTypeAsString()} (complex values)")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{where}: unsupported pixel type {img.GetPixelIDTypeAsString()} "
                         f"({img.GetNumberOfComponentsPerPixel()} components per voxel; need one grey value)")
    if img.GetDimension() != 3:
        raise InputError(f"{where}: a {img.GetDimension()}D image, need 3D (read files with read_image)")


def check_values(img: sitk.Image, where: str) -> None:
    a = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(a).all():
        n = int(np.size(a) - np.isfinite(a).sum())
        raise InputError(f"{where}: {n} voxels are NaN or infinite")


def check_geometry(img: sitk.Image, where: str) -> None:
    sp = np.array(img.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"{where}: broken geometry, voxel spacing {tuple(sp)} must be finite and positive")
    if not np.all(np.isfinite(img.GetOrigin())):
        raise InputError(f"{where}: broken geometry, origin {img.GetOrigin()} is not finite")
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise InputError(f"{where}: broken geometry, direction matrix {tuple(np.round(d.ravel(), 4))} "
                         "is not orthonormal")





def write_image(img: sitk.Image, path) -> str:
    """Write an image as NIfTI (.nii/.nii.gz) or NRRD/MHA (by extension); return the path."""
    if not isinstance(img, sitk.Image):
        raise InputError(f"not an image (got {type(img).__name__}, need a SimpleITK image)")
    path = os.fspath(path)
    if _ext(path) not in VOLUME_EXT:
        raise InputError(f"cannot write {path}: use .nii, .nii.gz, .nrrd or .mha")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, path, useCompression=_ext(path) in (".nrrd", ".mha"))
    return path


def read_label(path, ref_img: sitk.Image) -> sitk.Image:
    """Read a label map (contract.json values: 0 background, 1 lung, 2 infection, 3 right lung, 4 left lung)
    matching ``ref_img``; uint8 with its geometry."""
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise InputError(f"no such label file, or an empty one (0 bytes): {path}")
    lab = _as_3d(_sitk_read(path, "label map"), path)
    check_pixels(lab, path)
    if lab.GetSize() != ref_img.GetSize():
        raise InputError(f"label {path} has size {lab.GetSize()}, the image has {ref_img.GetSize()}")
    a = sitk.GetArrayViewFromImage(lab)
    odd = a[(a < 0) | (a > max(LABEL_VALUES)) | (a != np.round(a))] if a.dtype.kind == "f" else \
        a[(a < 0) | (a > max(LABEL_VALUES))]
    if odd.size:
        bad = np.unique(odd)[:10].tolist()
        raise InputError(f"label {path} holds unknown values {bad}: allowed are {list(LABEL_VALUES)}")
    sp_ok = np.allclose(lab.GetSpacing(), ref_img.GetSpacing(), rtol=1e-3, atol=1e-4)
    or_ok = np.allclose(lab.GetOrigin(), ref_img.GetOrigin(), atol=1e-2 * min(ref_img.GetSpacing()) + 1e-4)
    dir_ok = np.allclose(lab.GetDirection(), ref_img.GetDirection(), atol=1e-3)
    if not (sp_ok and or_ok and dir_ok):
        raise InputError(f"label {path} does not lie on the image grid: spacing {lab.GetSpacing()} vs "
                         f"{ref_img.GetSpacing()}, origin {lab.GetOrigin()} vs {ref_img.GetOrigin()}, "
                         f"direction {lab.GetDirection()} vs {ref_img.GetDirection()}")
    out = sitk.Cast(lab, sitk.sitkUInt8)
    out.CopyInformation(ref_img)
    return out
