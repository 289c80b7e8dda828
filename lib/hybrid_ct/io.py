"""Reading and checking CT images: always a 3D float32 SimpleITK image in Hounsfield units.

Every bad input raises ``hybrid_ct.errors.InputError`` with a message that names the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from hybrid_ct.errors import InputError
from hybrid_ct.preprocess import WINDOW_HU

# Anatomical reference levels of a chest slice in HU, measured by ``anatomy_levels`` on the real HU
# slices in ../shared/data (imlab volumes, Ma Jun coronacases, LIDC; medians; tests/test_io.py
# re-measures them): aerated lung parenchyma and the body's soft tissue (fat, muscle, blood).
HU_LUNG, HU_TISSUE = -870.0, -15.0
INTENSITIES = ("hu", "8bit", "8bit-auto")
PICTURE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXT = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_VALUES = (0, 1, 2)

# Chest check: share of body-enclosed voxels below -500 HU (lungs, airways, bowel gas).
# Measured on the real data in ../shared/data (body = largest component > -500 HU, holes filled per
# axial slice):
#   volumes_covid_ct_md/P001 (COVID-19 chest)          0.260
#   volumes_covid_ct_md/normal001 (normal chest)       0.147
#   lung3d_imlab/id001_image_hu.nii.gz                 0.346
#   lung3d_imlab/id002_image_hu.nii.gz                 0.207
#   phantoms (make_phantom, default shape)             about 0.2-0.3
#   dicom_misc/abdomen_series_not_chest (20 slices)    0.009  -> refused
#   dicom_misc/abdomen_nifti_not_chest/example_ct      0.020  -> refused
# 0.05 sits about a factor 2.5-3 from both groups.
MIN_LUNG_AIR_FRACTION = 0.05

# Chest check of a single axial slice (a picture, a 2D NPY, one DICOM file): a crop cannot close the body
# outline, so a 2D slice is judged on the lung pattern instead (``slice_chest_measures``, thresholds in
# ``SLICE_RULE``, checked in this order). Measured by benchmarks/chest_check.py (docs/pictures.md) on 1,925
# real or phantom axial chest slices (MedSeg 50, cls2d 1,824, Ma Jun 4, NY-SBU/LIDC/pydicom DICOM 11,
# phantoms 36) and on inputs that must be refused (248 abdominal/pelvic slices below the lung bases, HU and
# 8-bit; 2 NY-SBU slices at kidney level; 5 blank, 22 photo-like texture, 8 text pictures):
#   measure     chest slices: min (1st percentile)   threshold   what it refuses (count)
#   contrast    82 HU (673)  dim MosMed JPGs          50 HU       blank pictures 0-12 HU (4), a text page (1)
#   extent      0.27 (0.37)                           0.15        white-on-black text, body < 0.15 (4)
#   sharpness   0.137 (0.29) blurred UCSD crops       0.12        smooth textures, sigma >= 16 px: 0.02-0.115 (9)
#   dominance   0.345 (0.51) UCSD multi-panel crops   0.30        fine noise 0.05-0.32 (9), text strokes (3),
#                                                                 bowel gas in pieces (73)
#   air         0.036 (0.17) Ma Jun radiopaedia_14    0.025       abdominal slices, little gas (25)
#               slice 0: a lung-base slice
#   largest     0.0098 (0.059) the same lung base     0.005       abdominal slices, gas specks (6)
# Margins are thin on sharpness (0.137 vs 0.115) and dominance (0.345 vs 0.322). Not separated: a single
# slice at the lung bases and an upper-abdominal slice with bowel gas (air 0.036 vs up to 0.075): keeping
# every real chest slice lets 144 of 248 abdominal single slices, both NY-SBU kidney-level slices and 4 of
# 22 textures through; a whole abdominal volume is still refused by the 3D rule above.
SLICE_RULE = {"contrast": 50.0, "extent": 0.15, "sharpness": 0.12, "dominance": 0.30, "air": 0.025,
              "largest": 0.005}
MIN_PLANE_PIXELS = 16  # an axial plane narrower than this is a coronal/sagittal slice or a 1-pixel-thick volume

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


def _series_files(folder: str) -> list:
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
    return _read_dicom_files(_series_files(folder), folder)


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
    mapped linearly onto ``WINDOW_HU`` so that windowing gives back v / 255. ``"8bit-auto"`` is for
    pictures of unknown window (papers, other viewers): each slice is calibrated on its own anatomy
    (``calibrate_8bit``), falling back to ``"8bit"`` on an almost uniform picture. Structural problems
    (unreadable, empty, NaN, unsupported pixel type, broken geometry) raise InputError; see ``check_ct``
    for the rest.
    """
    if intensity not in INTENSITIES:
        raise InputError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    files = [os.fspath(f) for f in path] if isinstance(path, (list, tuple)) and path else None
    if files is not None:  # the files of one DICOM series, in slice order (hybrid_ct.batch: a case per series)
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
    _check_pixels(img, path)
    if intensity in ("8bit", "8bit-auto"):
        img = _from_8bit(img, path, calibrate=intensity == "8bit-auto")
    img = sitk.Cast(img, sitk.sitkFloat32)
    _check_values(img, path)
    _check_geometry(img, path)
    return img


def _from_8bit(img: sitk.Image, where: str, calibrate: bool = False) -> sitk.Image:
    a = sitk.GetArrayViewFromImage(img)
    if a.size and (float(a.min()) < 0 or float(a.max()) > 255):
        raise InputError(f"{where} is not an 8-bit image (values {a.min():g}..{a.max():g}); "
                         "use intensity='hu' for Hounsfield units")
    a = np.asarray(a, np.float32)
    hu = (calibrate_8bit(a) if calibrate else _lung_window_hu(a)).reshape(a.shape)
    out = sitk.GetImageFromArray(hu.astype(np.float32))
    out.CopyInformation(img)
    return out


def _lung_window_hu(g: np.ndarray) -> np.ndarray:
    """0..255 grey levels of a picture exported with the lung window -> HU (``WINDOW_HU``)."""
    lo, hi = WINDOW_HU
    return np.asarray(g, np.float32) * ((hi - lo) / 255.0) + lo


def otsu_threshold(values: np.ndarray, bins: int = 128, value_range=None) -> float:
    """Otsu's threshold of ``values``; the histogram spans ``value_range`` (default: min..max)."""
    values = np.asarray(values, np.float64).ravel()
    lo, hi = value_range or (float(values.min()), float(values.max()))
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centers[int(np.argmax(w0 * w1 * (mu0 - mu1) ** 2))])


def anatomy_levels(a2d: np.ndarray):
    """-> (lung level, soft-tissue level) of one axial chest slice in its own intensity scale, or None.

    Otsu (on the pixels strictly between the slice's minimum and maximum: no padding, no saturated
    pixels) splits dark (air) from bright (tissue); the body is the largest bright region; the lungs are
    the dark pixels it encloses. Levels are medians. HU slices are clipped to the lung window first.
    A crop whose lungs touch the border falls back to the medians of the two Otsu classes; None when
    even those are degenerate (an almost uniform picture)."""
    a = np.asarray(a2d, np.float32)
    if a.min() < -200:  # Hounsfield units
        a = np.clip(a, *WINDOW_HU)
    inner = a[(a > a.min()) & (a < a.max())]  # without padding and saturated pixels
    if inner.size < 0.05 * a.size:
        return None
    t = otsu_threshold(inner)
    body, filled = (m[0] for m in _largest_filled((a > t)[None]))
    if not body.any():
        return None
    lung = filled & ~body
    if lung.sum() >= 0.02 * a.size and body.sum() >= 0.05 * a.size:
        return float(np.median(a[lung])), float(np.median(a[body]))
    # a crop whose lungs touch the border: the two Otsu classes of the inner pixels
    dark, light = inner[inner <= t], inner[inner > t]
    if min(dark.size, light.size) < 0.05 * inner.size:
        return None
    return float(np.median(dark)), float(np.median(light))


def _volume_levels(g3: np.ndarray):
    """Anatomy levels of an 8-bit volume: medians over up to 9 slices spread over its middle 60 %
    (apex and base show little lung), None when fewer than 3 of them give levels."""
    d = len(g3)
    zs = np.unique(np.linspace(0.2 * (d - 1), 0.8 * (d - 1), 9).round().astype(int))
    found = [lv for lv in (anatomy_levels(g3[z]) for z in zs) if lv is not None]
    if len(found) < min(3, len(zs)):
        return None
    return tuple(float(v) for v in np.median(np.array(found), axis=0))


def calibrate_8bit(g: np.ndarray) -> np.ndarray:
    """An 8-bit picture of a chest slice (2D), or an 8-bit volume [z, y, x], -> HU, by mapping its
    lung and soft-tissue levels (``anatomy_levels``; a volume: one map for all its slices, from
    ``_volume_levels``) linearly onto ``HU_LUNG`` / ``HU_TISSUE``; the fixed lung-window mapping
    where the levels are not found or implausible (less than 20 grey levels apart)."""
    g = np.asarray(g, np.float32)
    lv = _volume_levels(g) if g.ndim == 3 and len(g) > 1 else anatomy_levels(g[0] if g.ndim == 3 else g)
    if lv is None or lv[1] - lv[0] < 20:
        return _lung_window_hu(g)
    lung, tissue = lv
    return HU_LUNG + (g - lung) * (HU_TISSUE - HU_LUNG) / (tissue - lung)


def _check_pixels(img, where: str) -> None:
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


def _check_values(img: sitk.Image, where: str) -> None:
    a = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(a).all():
        n = int(np.size(a) - np.isfinite(a).sum())
        raise InputError(f"{where}: {n} voxels are NaN or infinite")


def _check_geometry(img: sitk.Image, where: str) -> None:
    sp = np.array(img.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"{where}: broken geometry, voxel spacing {tuple(sp)} must be finite and positive")
    if not np.all(np.isfinite(img.GetOrigin())):
        raise InputError(f"{where}: broken geometry, origin {img.GetOrigin()} is not finite")
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise InputError(f"{where}: broken geometry, direction matrix {tuple(np.round(d.ravel(), 4))} "
                         "is not orthonormal")


def _largest_filled(mask: np.ndarray):
    """[n, h, w] bool -> (its largest connected region, that region with its holes filled per plane:
    background regions of a plane that do not reach the plane's border)."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask, mask
    region = mask
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        region = lab == sizes.argmax()
    per_slice = np.zeros((3, 3, 3), dtype=bool)
    per_slice[1] = ndi.generate_binary_structure(2, 1)
    bg, _ = ndi.label(~region, structure=per_slice)
    edge = np.unique(np.concatenate([bg[:, 0].ravel(), bg[:, -1].ravel(), bg[:, :, 0].ravel(), bg[:, :, -1].ravel()]))
    return region, region | ~np.isin(bg, edge)


def _body(a: np.ndarray, open_px: int = 0) -> np.ndarray:
    """[n, h, w] HU -> the body: the largest connected region above -500 HU, holes filled per plane;
    ``open_px``: first opened in-plane by a disk of that radius, which cuts off the table top (it touched
    the back on LUNG1-001, so the body held the table and the lung outlined on it stayed)."""
    mask = a > -500.0
    if open_px:
        disk = np.hypot(*np.ogrid[-open_px:open_px + 1, -open_px:open_px + 1]) <= open_px
        mask = ndi.binary_opening(mask, structure=disk[None])
    return _largest_filled(mask)[1]


def _lps_planes(img: sitk.Image):
    """-> (image in LPS order, its array as [planes, h, w]: axial slices, or the one slice's own plane)."""
    oriented = sitk.DICOMOrient(img, "LPS")
    a = sitk.GetArrayViewFromImage(oriented)  # a view: ``oriented`` must stay alive
    plane = [n for n in a.shape if n != 1]
    if len(plane) == 2:  # a single slice (axial, coronal or sagittal): work in its own plane
        a = a.reshape((1, *plane))
    return oriented, a


def body_mask(img: sitk.Image) -> np.ndarray:
    """Boolean [z, y, x] mask of the patient's body in ``img``'s own array layout (see ``_body``): air
    outside it (room, table gap, clothes) is not lung."""
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    oriented, a = _lps_planes(img)
    k = 2 if max(a.shape[1:]) > 256 else 1  # in-plane stride: a body outline needs no sub-millimetre detail
    px = float(min(oriented.GetSpacing()[:2])) * k  # whole volumes: open by ~6 mm (thinner than a table top)
    body = _body(a[:, ::k, ::k], open_px=int(6.0 // px) if a.shape[0] >= 8 and px <= 3.0 else 0)
    if k > 1:
        body = body.repeat(k, axis=1).repeat(k, axis=2)[:, : a.shape[1], : a.shape[2]]
    m = sitk.GetImageFromArray(body.reshape(sitk.GetArrayViewFromImage(oriented).shape).astype(np.uint8))
    m.CopyInformation(oriented)
    return sitk.GetArrayFromImage(sitk.DICOMOrient(m, code)).astype(bool)


def lung_air_fraction(img: sitk.Image) -> float:
    """Share of the body (``_body``) that is air-density (< -500 HU): lungs and airways in a chest,
    bowel gas elsewhere. Large images are subsampled (a ratio does not need every voxel)."""
    _, a = _lps_planes(img)
    step = max(1, int(np.ceil(max(a.shape[1:]) / 256)))
    zstep = max(1, int(np.ceil(a.shape[0] / 160)))
    a = a[::zstep, ::step, ::step]
    filled = _body(a)
    total = int(filled.sum())
    return float((filled & (a < -500.0)).sum()) / total if total else 0.0


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """2D bool mask -> its convex hull (filled), on the same grid."""
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    try:
        hull = ConvexHull(np.stack([xs, ys], 1).astype(float))
    except (QhullError, ValueError):  # fewer than 3 points, or all on a line
        return mask.copy()
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    eq = hull.equations
    inside = (eq[:, :2] @ np.stack([xx.ravel(), yy.ravel()]) + eq[:, 2:] <= 0.5).all(0)
    return inside.reshape(mask.shape) | mask


def slice_chest_measures(a2d: np.ndarray) -> dict:
    """The lung pattern of one axial slice (HU, or a calibrated picture), on a grid of at most 256 pixels:

    - ``contrast``: soft-tissue minus lung level (``anatomy_levels``), HU; dark = below their midpoint;
    - ``extent``: share of the picture inside the convex hull of the body (largest bright region), which
      also holds lungs that a crop has cut open at the border;
    - ``air``: share of that hull that is dark (lungs, airways, bowel gas);
    - ``largest``: the largest dark region in the hull (after a 3x3 opening), as a share of the hull;
    - ``dominance``: share of the hull's dark pixels in its two largest regions (lungs, not noise);
    - ``sharpness``: median step across the dark/bright boundary over ``contrast`` (CT edges are sharp;
      smooth textures are not)."""
    a = np.clip(np.asarray(a2d, np.float32), *WINDOW_HU)
    k = max(1, int(np.ceil(max(a.shape) / 256)))
    a = a[::k, ::k]
    none = {"contrast": 0.0, "extent": 0.0, "air": 0.0, "largest": 0.0, "dominance": 0.0, "sharpness": 0.0}
    lv = anatomy_levels(a)
    if lv is None or lv[1] <= lv[0]:
        return none
    contrast = lv[1] - lv[0]
    dark = a < (lv[0] + lv[1]) / 2
    body = _largest_filled((~dark)[None])[0][0]
    if not body.any():
        return {**none, "contrast": float(contrast)}
    hull = _convex_hull(body)
    inside = ndi.binary_opening(dark & hull, structure=np.ones((3, 3), bool))
    lab, n = ndi.label(inside)
    sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1] if n else np.zeros(1)
    steps = np.concatenate([np.abs(np.diff(a, axis=1))[dark[:, 1:] != dark[:, :-1]],
                            np.abs(np.diff(a, axis=0))[dark[1:] != dark[:-1]]])
    h = float(hull.sum())
    return {"contrast": float(contrast), "extent": h / a.size, "air": float((dark & hull).sum()) / h,
            "largest": float(sizes[0]) / h, "dominance": float(sizes[:2].sum()) / max(float(sizes.sum()), 1.0),
            "sharpness": float(np.median(steps)) / contrast if steps.size else 0.0}


def slice_chest_problem(a2d: np.ndarray):
    """None when one axial slice shows the lung pattern (``SLICE_RULE``), else why not (the first measure
    below its threshold)."""
    m = slice_chest_measures(a2d)
    why = {"contrast": "almost uniform (lung and soft-tissue levels {v:.0f} HU apart)",
           "extent": "no body: its outline covers {p:.1f} % of the picture",
           "sharpness": "no sharp tissue edges (edge step {v:.2f} of the contrast): not a CT picture",
           "dominance": "air-density pixels scattered in small pieces ({p:.0f} % in the two largest): not lungs",
           "air": "only {p:.1f} % of the body is air-density (lungs)",
           "largest": "no lung-sized air-density region (largest {p:.2f} % of the body)"}
    for key, text in why.items():
        if m[key] < SLICE_RULE[key]:
            need = SLICE_RULE[key] if key in ("contrast", "sharpness") else 100 * SLICE_RULE[key]
            return text.format(v=m[key], p=100 * m[key]) + f", need at least {need:g}" + \
                ("" if key in ("contrast", "sharpness", "dominance") else " %")
    return None


def _axial_plane(img: sitk.Image):
    """-> (sizes of the axial plane's two axes (left-right, front-back), size along head-feet), from the
    direction matrix: each index axis counts for the patient axis it runs closest to."""
    d = np.abs(np.array(img.GetDirection(), dtype=float).reshape(3, 3))
    size = img.GetSize()
    along = [int(np.argmax(d[:, i])) for i in range(3)]  # 0 left-right, 1 front-back, 2 head-feet
    if sorted(along) != [0, 1, 2]:  # an oblique matrix that maps two axes to one: keep the index order
        along = [0, 1, 2]
    by_axis = {a: size[i] for i, a in enumerate(along)}
    return (by_axis[0], by_axis[1]), by_axis[2]


def _check_axial(img: sitk.Image, where: str) -> None:
    """Refuse a coronal / sagittal slice and a volume whose axial plane is (almost) one pixel wide: the
    network reads axial slices, and such an image would be read as hundreds of one-pixel-thin slices."""
    (lr, fb), hf = _axial_plane(img)
    if min(lr, fb) >= MIN_PLANE_PIXELS:
        return
    if fb < MIN_PLANE_PIXELS and lr >= MIN_PLANE_PIXELS:
        plane = "a coronal slice" if fb == 1 else f"a coronal slab ({fb} pixels front to back)"
    elif lr < MIN_PLANE_PIXELS and fb >= MIN_PLANE_PIXELS:
        plane = "a sagittal slice" if lr == 1 else f"a sagittal slab ({lr} pixels left to right)"
    else:
        plane = "a line of pixels"
    raise InputError(f"{where}: not axial: {plane} (size {img.GetSize()}; axial plane {lr} x {fb} pixels, "
                     f"need at least {MIN_PLANE_PIXELS} x {MIN_PLANE_PIXELS}); give axial slices or the whole series")


def check_ct(img, require_chest: bool = True, min_slices: int = 1) -> sitk.Image:
    """Check that ``img`` (a SimpleITK image or a path) is a usable CT in HU; return the image.

    Raises InputError for: unreadable / not an image, empty, NaN or inf, unsupported pixel type,
    broken geometry, values not in HU (e.g. an 8-bit picture), not axial (a coronal or sagittal slice, a
    one-pixel-thin axial plane: ``_check_axial``), fewer than ``min_slices`` axial slices, and
    (``require_chest``) not a chest: a volume with too little air inside the body (``lung_air_fraction``),
    a single axial slice without the lung pattern (``slice_chest_problem``).
    """
    if isinstance(img, (str, os.PathLike)):
        where = os.fspath(img)
        img = read_image(img)
    else:
        where = "image"
    _check_pixels(img, where)
    _check_values(img, where)
    _check_geometry(img, where)
    a = sitk.GetArrayViewFromImage(img)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0:
        kind = "an 8-bit picture" if hi <= 255 else "raw stored values without rescale"
        raise InputError(f"{where}: values {lo:g}..{hi:g} HU are not Hounsfield units (no air below 0 HU; "
                         f"looks like {kind}); read 8-bit pictures with intensity='8bit'")
    _check_axial(img, where)
    n_slices = _axial_plane(img)[1]
    if n_slices < int(min_slices):
        raise InputError(f"{where}: {n_slices} slice(s), but a 3D volume of at least {min_slices} slices is needed")
    if require_chest and n_slices == 1:
        problem = slice_chest_problem(np.squeeze(sitk.GetArrayViewFromImage(img)))
        if problem:
            raise InputError(f"{where}: not a chest CT slice: {problem}")
    elif require_chest:
        frac = lung_air_fraction(img)
        if frac < MIN_LUNG_AIR_FRACTION:
            raise InputError(f"{where}: clearly not a chest CT: only {100 * frac:.1f} % of the body is air-density "
                             f"(lungs), need at least {100 * MIN_LUNG_AIR_FRACTION:.0f} %")
    return img


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
    """Read a label map (0 background, 1 lung, 2 infection) matching ``ref_img``; uint8 with its geometry."""
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise InputError(f"no such label file, or an empty one (0 bytes): {path}")
    lab = _as_3d(_sitk_read(path, "label map"), path)
    _check_pixels(lab, path)
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
