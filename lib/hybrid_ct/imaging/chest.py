"""Is this a usable axial chest CT? ``check_ct`` and the rules it measures (air inside the body for a volume,
the lung pattern for a single slice, an axial plane for both)."""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from hybrid_ct.errors import InputError
from hybrid_ct.imaging.body import convex_hull, largest_filled, lung_air_fraction
from hybrid_ct.imaging.calibration import EXPORT_WINDOW_HU, anatomy_levels
from hybrid_ct.imaging.reader import check_geometry, check_pixels, check_values, read_image


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
    a = np.clip(np.asarray(a2d, np.float32), *EXPORT_WINDOW_HU)
    k = max(1, int(np.ceil(max(a.shape) / 256)))
    a = a[::k, ::k]
    none = {"contrast": 0.0, "extent": 0.0, "air": 0.0, "largest": 0.0, "dominance": 0.0, "sharpness": 0.0}
    lv = anatomy_levels(a)
    if lv is None or lv[1] <= lv[0]:
        return none
    contrast = lv[1] - lv[0]
    dark = a < (lv[0] + lv[1]) / 2
    body = largest_filled((~dark)[None])[0][0]
    if not body.any():
        return {**none, "contrast": float(contrast)}
    hull = convex_hull(body)
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
    check_pixels(img, where)
    check_values(img, where)
    check_geometry(img, where)
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
