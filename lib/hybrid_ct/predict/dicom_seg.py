"""DICOM-SEG output: a label map in the source series' geometry + the source CT series -> one DICOM-SEG file.

    path = write_dicom_seg(label, "dicom_dir/", "case_seg.dcm", model_version="v3")
    label_again = read_dicom_seg(path)          # the same label map (uint8, same geometry)

Written with ``pydicom-seg`` (offline; not dcmqi, not highdicom), from the label contract
(``contract.json``): one segment per class present in the label map (right lung 3, left lung 4, infection 2,
lung without a side 1), numbered 1..n in the contract's order (DICOM wants segment numbers 1, 2, ... without
gaps, so the number is not the label value: ``read_dicom_seg`` maps segments back by their codes), with its
name (SegmentLabel), SNOMED CT category / type codes, the type modifier Right / Left of the sided lungs
(SegmentedPropertyTypeModifierCodeSequence, inside the type's item), the anatomic region for infection,
and its colour as CIELab RecommendedDisplayCIELabValue. The SEG is a BINARY segmentation, one frame per
non-empty slice and segment, in the same study and frame of reference as the source series; ReferencedSeriesSequence names the source series and every frame's
DerivationImageSequence / SourceImageSequence names the source slice's SOP Instance UID.

A label map whose grid is not the source series' grid (another orientation, spacing or size) is
resampled to it with nearest neighbour first. An empty label map (no lung, no infection) has no
DICOM-SEG representation: ``InputError``.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from hybrid_ct.contract import CONTRACT, FOREGROUND
from hybrid_ct.errors import InputError
from hybrid_ct.imaging.reader import series_files as folder_series_files

log = logging.getLogger("hybrid_ct")

SERIES_DESCRIPTION = "Hybrid CT segmentation"
# what a PACS list shows of an automatic result: the call in the contract's words (JSON, Slicer, PDF alike)
CALL_SERIES_DESCRIPTION: dict = CONTRACT["report"]["call"]["series_description"]


def call_series_description(call_label) -> str:
    """The SeriesDescription of a DICOM-SEG made with the scan call ``call_label`` (the generic one without)."""
    return CALL_SERIES_DESCRIPTION.get(str(call_label or ""), SERIES_DESCRIPTION)
MANUFACTURER = "Hybrid CT"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hybrid-ct")
    except PackageNotFoundError:
        return "0.0.0"


def _code(entry) -> dict:
    scheme, value, meaning = entry
    return {"CodeValue": value, "CodingSchemeDesignator": scheme, "CodeMeaning": meaning}


def _codes_key(category, type_, modifier) -> tuple:
    """(category, type, type modifier or None) code values: what a segment means, whatever its number."""
    return category[1], type_[1], modifier[1] if modifier else None


def _type_modifier(segment):
    """A segment's type modifier sequence: nested in its type item (the standard), or beside it (older writers)."""
    return segment.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence") \
        or segment.get("SegmentedPropertyTypeModifierCodeSequence")


def segment_numbers(values) -> dict:
    """Label value -> DICOM segment number: the ``values`` given, numbered 1..n in the contract's order."""
    wanted = set(int(v) for v in values) - {0}
    return {d["value"]: k for k, d in enumerate((d for d in CONTRACT["labels"] if d["value"] in wanted), start=1)}


def segment_template(algorithm_type: str = "AUTOMATIC", algorithm_name: str = "Hybrid CT",
                     series_description: str = SERIES_DESCRIPTION, creator: str = "HybridCT^Model", values=None):
    """The pydicom-seg template (a dcmqi ``metainfo.json`` as a dataset) from the label contract, one segment
    per label value of ``values`` (default: every foreground label), numbered as ``segment_numbers``.

    ``algorithm_type``: AUTOMATIC (a model's prediction), SEMIAUTOMATIC (a prediction corrected by a
    reader) or MANUAL (drawn by hand: no algorithm name then)."""
    from pydicom_seg.template import from_dcmqi_metainfo

    if algorithm_type not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
        raise ValueError(f"algorithm_type {algorithm_type!r}: AUTOMATIC, SEMIAUTOMATIC or MANUAL")
    numbers = segment_numbers(FOREGROUND.values() if values is None else values)
    segments = []
    for d in CONTRACT["labels"]:
        if d["value"] not in numbers:
            continue
        seg = {"labelID": numbers[d["value"]], "SegmentLabel": d["segment"], "SegmentDescription": d["description"],
               "SegmentAlgorithmType": algorithm_type,
               "SegmentedPropertyCategoryCodeSequence": _code(d["category"]),
               "SegmentedPropertyTypeCodeSequence": _code(d["type"]),
               "recommendedDisplayRGBValue": list(d["color"])}
        if algorithm_type != "MANUAL":
            seg["SegmentAlgorithmName"] = algorithm_name
        if d.get("type_modifier"):
            seg["SegmentedPropertyTypeModifierCodeSequence"] = _code(d["type_modifier"])
        if d.get("anatomic_region"):
            seg["AnatomicRegionSequence"] = _code(d["anatomic_region"])
        segments.append(seg)
    meta = {"ContentCreatorName": creator, "ClinicalTrialSeriesID": "Session1", "ClinicalTrialTimePointID": "1",
            "SeriesDescription": series_description, "SeriesNumber": "300", "InstanceNumber": "1",
            "BodyPartExamined": "CHEST", "segmentAttributes": [segments]}
    return from_dcmqi_metainfo(meta)


def series_files(source) -> list:
    """The files of the source CT series: a folder (the series ``hybrid_ct.imaging.reader.read_image`` reads from
    it) or a list of files (returned as is)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return list(folder_series_files(str(source)))
    files = [str(f) for f in ([source] if isinstance(source, (str, Path)) else source)]
    if not files:
        raise InputError("no source DICOM files given for the DICOM-SEG")
    return files


def _headers(files: list) -> list:
    import pydicom

    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for a bad file
            raise InputError(f"cannot read the DICOM header of {f}: {e}") from e
        if "ImagePositionPatient" not in ds or "SOPInstanceUID" not in ds:
            raise InputError(f"{f} is not a slice of an image series (no ImagePositionPatient / SOPInstanceUID)")
        out.append(ds)
    series = {str(d.get("SeriesInstanceUID", "")) for d in out}
    if len(series) != 1:
        raise InputError(f"the source files belong to {len(series)} series: give the files of one series")
    return out


def reference_grid(headers: list):
    """An empty uint8 SimpleITK image on the source series' voxel grid (from the headers alone)."""
    import SimpleITK as sitk

    h0 = headers[0]
    iop = [float(v) for v in h0.ImageOrientationPatient]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    pos = sorted((float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])), i)
                 for i, h in enumerate(headers))
    first = headers[pos[0][1]]
    dz = float(np.median(np.diff([p for p, _ in pos]))) if len(pos) > 1 else float(h0.get("SliceThickness", 1) or 1)
    if dz <= 0:
        raise InputError("the source series has several slices at one position: not a single volume")
    sy, sx = (float(v) for v in h0.PixelSpacing)
    img = sitk.Image(int(h0.Columns), int(h0.Rows), len(headers), sitk.sitkUInt8)
    img.SetOrigin([float(v) for v in first.ImagePositionPatient])
    img.SetSpacing((sx, sy, dz))
    img.SetDirection(np.stack([row, col, normal], axis=1).ravel().tolist())
    return img


def _same_grid(a, b, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def on_source_grid(label, headers: list):
    """The label map as uint8 on the source series' grid (resampled, nearest neighbour, when it is not)."""
    import SimpleITK as sitk

    if label.GetDimension() != 3:
        raise InputError(f"a DICOM-SEG needs a 3D label map, got {label.GetDimension()}D")
    ref = reference_grid(headers)
    arr = sitk.GetArrayViewFromImage(label)
    bad = sorted(set(np.unique(arr).tolist()) - {0, *FOREGROUND.values()})
    if bad:
        raise InputError(f"label values {bad[:5]} are not in the label contract {dict(FOREGROUND)}")
    lab = sitk.Cast(label, sitk.sitkUInt8)
    if not _same_grid(lab, ref):
        log.info("label map %s resampled onto the source series grid %s", lab.GetSize(), ref.GetSize())
        lab = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    else:
        lab.CopyInformation(ref)
    return lab


def build_dicom_seg(label, source, algorithm_type: str = "AUTOMATIC", model_version: str | None = None,
                    series_description: str = SERIES_DESCRIPTION, series_number: int = 300):
    """The DICOM-SEG as a pydicom Dataset (see the module doc); ``source``: the series folder or files."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    headers = _headers(series_files(source))
    lab = on_source_grid(label, headers)
    arr = sitk.GetArrayFromImage(lab)
    if not np.any(arr):
        raise InputError("the label map is empty (no lung, no infection): there is nothing to write as DICOM-SEG")
    numbers = segment_numbers(np.flatnonzero(np.bincount(arr.ravel())))
    lut = np.zeros(max(FOREGROUND.values()) + 1, np.uint8)
    for value, number in numbers.items():
        lut[value] = number
    numbered = sitk.GetImageFromArray(lut[arr])
    numbered.CopyInformation(lab)
    lab = numbered
    template = segment_template(algorithm_type, series_description=series_description, values=numbers)
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=True,
                                          skip_missing_segment=False)
    src = copy.deepcopy(headers[0])  # pydicom-seg shares (and then changes) the first header's elements
    ds = writer.write(lab, headers)
    # pydicom-seg 0.4.1 imports the source's FrameOfReferenceUID, then overwrites it with a new one:
    # the SEG must share the source's frame of reference (else viewers will not overlay it)
    # (a source without one keeps the new UID: the SEG's Frame of Reference module needs it)
    for key in ("FrameOfReferenceUID", "PositionReferenceIndicator"):
        if key in src:
            ds[key] = src[key]
    for s in ds.SegmentSequence:  # the standard nests the type modifier in the type's item; pydicom-seg puts it beside
        if "SegmentedPropertyTypeModifierCodeSequence" in s:
            s.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
                s.SegmentedPropertyTypeModifierCodeSequence
            del s.SegmentedPropertyTypeModifierCodeSequence
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.ContentLabel = "HYBRIDCT"
    ds.ContentDescription = f"{', '.join(s.SegmentLabel for s in ds.SegmentSequence)} ({algorithm_type.lower()})"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "hybrid-ct"
    ds.SoftwareVersions = [f"hybrid-ct {_version()}"] + ([f"model {model_version}"] if model_version else [])
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                "AccessionNumber", "ReferringPhysicianName", "BodyPartExamined", "PositionReferenceIndicator"):
        if key not in ds:  # type 2 attributes (Patient, General Study, Frame of Reference): present, maybe empty
            ds[key] = src[key] if key in src else pydicom.DataElement(pydicom.datadict.tag_for_keyword(key),
                                                                       pydicom.datadict.dictionary_VR(key), "")
    return ds


def write_dicom_seg(label, source, out_path, algorithm_type: str = "AUTOMATIC", model_version: str | None = None,
                    series_description: str = SERIES_DESCRIPTION) -> Path:
    """Write the DICOM-SEG of ``label`` (SimpleITK) for the source series (folder or files) to ``out_path``."""
    ds = build_dicom_seg(label, source, algorithm_type, model_version, series_description)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    ds.save_as(str(tmp), write_like_original=False)
    tmp.replace(out)
    return out


def read_dicom_seg(path, source=None):
    """A DICOM-SEG file -> (multi-class uint8 label map as SimpleITK image, pydicom Dataset). Segment
    numbers are mapped to label values through the segment's SNOMED category, type and type modifier codes
    (falling back to the number for codes outside the contract). The SEG holds only the slices with a
    segment: with ``source`` (the source series folder / files, or a SimpleITK image on its grid) the label map is
    put back on the whole source grid (zeros elsewhere)."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read {path} as DICOM: {e}") from e
    if str(ds.get("Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise InputError(f"{path} is not a DICOM-SEG (modality {ds.get('Modality', '?')!r})")
    result = pydicom_seg.MultiClassReader().read(ds)
    img = sitk.Cast(result.image, sitk.sitkUInt8)
    by_codes = {_codes_key(d["category"], d["type"], d.get("type_modifier")): d["value"]
                for d in CONTRACT["labels"] if d["value"]}
    mapping = {}
    for s in ds.SegmentSequence:
        modifier = _type_modifier(s)
        key = (s.SegmentedPropertyCategoryCodeSequence[0].CodeValue, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
               modifier[0].CodeValue if modifier else None)
        mapping[int(s.SegmentNumber)] = by_codes.get(key, int(s.SegmentNumber))
    if any(k != v for k, v in mapping.items()):
        arr = sitk.GetArrayFromImage(img)
        out = np.zeros_like(arr)
        for k, v in mapping.items():
            out[arr == k] = v
        new = sitk.GetImageFromArray(out)
        new.CopyInformation(img)
        img = new
    if source is not None:
        ref = source if isinstance(source, sitk.Image) else reference_grid(_headers(series_files(source)))
        img = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return img, ds


__all__ = ["segment_numbers", "segment_template", "series_files", "reference_grid", "on_source_grid", "build_dicom_seg",
           "write_dicom_seg", "read_dicom_seg", "call_series_description"]
