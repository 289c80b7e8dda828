"""Batch prediction: inputs (files, DICOM folders and PACS export trees, folders of files) -> cases (one
per file, one per DICOM series) -> label, JSON report and overlay per case (``predict_case``), and the rows
of ``summary.csv`` (DICOM series that are not CT volumes are listed there as skipped). The loop over the cases,
resumable, is ``hybrid_ct.predict.runner.predict_batch`` (one process) or ``hybrid_ct.predict.cluster`` (Dask).

    cases, problems = expand_inputs(["scan.nii.gz", "dicom_dir/", "slices/"])
    row = predict_case(Predictor.from_checkpoint(default_model_path()), cases[0], Path("results/"))
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid_ct.errors import InputError
from hybrid_ct.files import jsonable
from hybrid_ct.imaging.reader import read_image, write_image
from hybrid_ct.predict.dicom_seg import call_series_description, write_dicom_seg
from hybrid_ct.predict.overlays import overlay_panels
from hybrid_ct.predict.pdf_report import write_scan_report
from hybrid_ct.processing.grid import window

log = logging.getLogger("hybrid_ct")

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _strip_ext(name: str) -> str:
    low = name.lower()
    for s in sorted(VOLUME_SUFFIXES + PICTURE_SUFFIXES + DICOM_SUFFIXES + (".npy",), key=len, reverse=True):
        if low.endswith(s):
            return name[: -len(s)]
    return name




@dataclass
class Case:
    name: str
    path: Path
    kind: str  # "volume" (NIfTI/NRRD/MHA/3D NPY), "dicom" (folder or file), "2d" (picture / 2D NPY)
    files: tuple = ()  # a DICOM series found in a folder tree: its files in slice order (read as one volume)
    series_uid: str = ""
    series: str = ""  # 'CT "Chest 1.25 mm" #3': modality, SeriesDescription, SeriesNumber
    skipped: str = ""  # why this DICOM series is not run (localizer, non-CT, too few slices, unreadable)


def _is_dicom_folder(folder: Path) -> bool:
    """Whether GDCM finds a DICOM series directly in ``folder`` (used by the app's DICOMweb store)."""
    import SimpleITK as sitk

    files = [q for q in folder.iterdir() if q.is_file() and not q.name.startswith(".")]
    if not files or all(_file_kind(q) in ("volume", "2d") for q in files):
        return False  # only NIfTI / pictures / NPY: no need to ask GDCM
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is an answer, not a warning
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


# ----------------------------------------------------------------------------------------------------
# DICOM series in folder trees (PACS exports: patient/study/series folders, or several series in one)

MIN_SERIES_SLICES = 3  # a DICOM series found in a folder with fewer slices is skipped (--min-slices)
LOCALIZER_TYPES = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"}
LOCALIZER_WORDS = re.compile(r"(?<![a-z])(scout|topogram|localizer|localiser|surview|scanogram|survey)(?![a-z])",
                             re.I)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame kinds: screenshots, dose screens
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# files never opened as DICOM in a tree (viewer programs and notes of an exported CD, volumes, pictures)
NOT_DICOM_SUFFIXES = VOLUME_SUFFIXES + PICTURE_SUFFIXES + (
    ".npy", ".txt", ".csv", ".json", ".xml", ".htm", ".html", ".pdf", ".md", ".zip", ".gz", ".ini", ".inf",
    ".log", ".exe", ".dll", ".js", ".css", ".jar", ".db", ".bat", ".sh", ".cfg", ".xsl", ".ico")


@dataclass
class _Series:
    uid: str
    heads: list  # (path, header) per SOP instance
    folders: set
    sops: set


def _dicom_candidate(p: Path) -> tuple:
    """(try to read it, report it when it is unreadable)."""
    low = p.name.lower()
    if p.name.startswith(".") or low.endswith(NOT_DICOM_SUFFIXES):
        return False, False
    suffix = p.suffix[1:]
    named = low.endswith(DICOM_SUFFIXES) or not suffix or suffix.isdigit()  # x.dcm, IM0001, CT.1.2.840.113619
    return True, named


def _read_header(p: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(p), stop_before_pixels=True)
    except InvalidDicomError:  # no 128-byte preamble: some exporters write raw data sets
        ds = pydicom.dcmread(str(p), stop_before_pixels=True, force=True)
        if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
            raise InvalidDicomError("not a DICOM file (no preamble, no SOP class)") from None
        return ds


def scan_dicom(folder: Path, recursive: bool = True) -> tuple:
    """Every DICOM series under ``folder`` grouped by SeriesInstanceUID (not by folder: a folder may hold
    several series, a series may span folders) -> (series list, unreadable [(folder, files, first error)])."""
    by_uid, bad = {}, {}
    walk = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, dirs, names in walk:
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in place: os.walk skips hidden folders
        for n in sorted(names):
            f = Path(root) / n
            if not f.is_file():
                continue
            try_it, report = _dicom_candidate(f)
            if not try_it or n.upper() == "DICOMDIR":
                continue
            try:
                ds = _read_header(f)
            except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for a file that is not DICOM
                if report:
                    bad.setdefault(root, []).append((f.name, " ".join(str(e).split()) or type(e).__name__))
                continue
            meta = getattr(ds, "file_meta", None)
            if str(getattr(meta, "MediaStorageSOPClassUID", "") or "") == DICOMDIR_CLASS:
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "") or f"(no SeriesInstanceUID) {root}"
            s = by_uid.setdefault(uid, _Series(uid, [], set(), set()))
            sop = str(ds.get("SOPInstanceUID", "") or "")
            if sop and sop in s.sops:
                continue  # the same instance exported twice
            s.sops.add(sop)
            s.heads.append((f, ds))
            s.folders.add(root)
    unreadable = [(Path(r), [n for n, _ in v], f"{v[0][0]}: {v[0][1]}") for r, v in sorted(bad.items())]
    return sorted(by_uid.values(), key=lambda s: (min(s.folders), _num(s.heads[0][1], "SeriesNumber"), s.uid)), \
        unreadable


def _num(ds, key, default=0.0) -> float:
    try:
        return float(ds.get(key, default))
    except (TypeError, ValueError):
        return default


def _normal(ds):
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        n = np.cross(iop[:3], iop[3:6])
        return n if np.isfinite(n).all() and np.linalg.norm(n) > 0.5 else None
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _ordered(heads: list) -> list:
    """Files in slice order: position along the slice normal (as GDCM's sorter), else InstanceNumber."""
    n = _normal(heads[0][1])
    try:
        if n is None:
            raise ValueError
        key = {f: float(np.dot([float(v) for v in ds.ImagePositionPatient], n)) for f, ds in heads}
    except (AttributeError, TypeError, ValueError, IndexError):
        key = {f: _num(ds, "InstanceNumber") for f, ds in heads}
    return sorted((f for f, _ in heads), key=lambda f: (key[f], str(f)))


def _skip_reason(s: _Series, min_slices: int) -> str:
    """Why a DICOM series is not a CT volume to run ('' when it is)."""
    heads = [ds for _, ds in s.heads]
    ds = heads[0]
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if s.uid.startswith("(no SeriesInstanceUID)"):
        return "unreadable: DICOM files without a SeriesInstanceUID"
    if modality and modality != "CT":
        return f"non-CT modality {modality}"
    types = {str(t).strip().upper() for h in heads for t in (h.get("ImageType", None) or [])}
    loc = sorted(types & LOCALIZER_TYPES)
    if loc:
        return f"localizer / scout (ImageType {loc[0]})"
    desc = str(ds.get("SeriesDescription", "") or "")
    if LOCALIZER_WORDS.search(desc):
        return f"localizer / scout (series description {desc!r})"
    if str(ds.get("SOPClassUID", "") or "").startswith(SECONDARY_CAPTURE):
        return "secondary capture (a picture of a screen, e.g. a dose report, not CT slices)"
    if "Rows" not in ds or "Columns" not in ds:
        return "unreadable: no image in the DICOM files (no Rows / Columns)"
    n_slices = sum(max(1, int(_num(h, "NumberOfFrames", 1))) for h in heads)
    normal = _normal(ds)
    if n_slices == 1 and normal is not None and int(np.argmax(np.abs(normal))) != 2:
        plane = "sagittal" if int(np.argmax(np.abs(normal))) == 0 else "coronal"
        if types & {"REFORMATTED", "MPR"}:
            return f"a single {plane} reformatted slice, not an axial volume"
        return f"localizer / scout (a single {plane} projection)"
    if n_slices < min_slices:
        return (f"too few slices: {n_slices} (a series needs at least {min_slices}; --min-slices 1, or the "
                f"file itself as input, runs it)")
    if len({(int(_num(h, "Rows")), int(_num(h, "Columns"))) for h in heads}) > 1:
        return "unreadable: slices of different sizes in one series"
    normals = [_normal(h) for h in heads]
    if any(v is None for v in normals) and not all(v is None for v in normals) or \
            any(v is not None and abs(float(np.dot(v, normal))) < 0.999 for v in normals):
        return "unreadable: slices of different orientations in one series (not one volume)"
    if normal is not None and len(heads) > 1:
        pos = []
        for h in heads:
            try:
                pos.append(round(float(np.dot([float(v) for v in h.ImagePositionPatient], normal)), 3))
            except (AttributeError, TypeError, ValueError, IndexError):
                break
        else:
            if len(set(pos)) < len(pos):
                return (f"unreadable: {len(pos) - len(set(pos))} slice(s) at the same position (several "
                        "acquisitions in one series)")
    return ""


def _safe(text, limit: int = 32) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(text or "")).strip("._-")[:limit].strip("._-")


def _series_name(s: _Series) -> str:
    """patient_study_series_<UID suffix>: readable, filesystem-safe (made unique by expand_inputs)."""
    ds = s.heads[0][1]
    patient = _safe(ds.get("PatientID", "")) or _safe(ds.get("PatientName", ""))
    study = _safe(ds.get("StudyDescription", "")) or _safe(ds.get("StudyDate", ""))
    number = str(ds.get("SeriesNumber", "") or "")
    series = _safe(ds.get("SeriesDescription", "")) or (f"S{_safe(number)}" if number else "series")
    suffix = re.sub(r"\D", "", s.uid)[-6:] or "x"
    return "_".join(p for p in (patient, study, series, suffix) if p)


def _series_label(ds) -> str:
    parts = [str(ds.get("Modality", "") or "?"), f'"{ds.get("SeriesDescription", "") or ""}"']
    if str(ds.get("SeriesNumber", "") or ""):
        parts.append(f"#{ds.SeriesNumber}")
    return " ".join(parts)


def _file_kind(p: Path) -> str | None:
    low = p.name.lower()
    if low.endswith(VOLUME_SUFFIXES):
        return "volume"
    if low.endswith(PICTURE_SUFFIXES):
        return "2d"
    if low.endswith(".npy"):
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            return "2d" if arr.ndim == 2 else "volume"
        except Exception:  # noqa: BLE001 - io.read_image reports the problem later
            return "2d"
    if low.endswith(DICOM_SUFFIXES):
        return "dicom"
    return None


def expand_inputs(inputs, min_slices: int = MIN_SERIES_SLICES) -> tuple:
    """Paths -> (cases, problems). A file is one case. A folder is walked, nested folders included, for
    DICOM series (by SeriesInstanceUID): each CT series is one case, named patient_study_series_<UID
    suffix> (a folder holding exactly one series, directly: the folder's name), and what is not a CT
    volume (localizer / scout, non-CT modality, secondary capture, fewer than ``min_slices`` slices,
    unreadable) is a case with ``skipped`` set, listed in summary.csv, never run. NIfTI / picture / NPY
    files directly in the folder (not nested) are each their own case."""
    cases, problems, names = [], [], set()

    def unique(base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base) or "case"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        return name

    def add(path: Path, kind: str):
        cases.append(Case(unique(_strip_ext(path.name)), path, kind))

    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            problems.append((str(p), f"no such file or folder: {p}"))
        elif p.is_dir():
            try:
                series, unreadable = scan_dicom(p)
            except OSError as e:
                problems.append((str(p), f"cannot walk folder {p}: {e}"))
                continue
            one = len(series) == 1 and series[0].folders == {str(p)}  # a plain series folder
            for s in series:
                files = _ordered(s.heads)
                folder = Path(os.path.commonpath([str(Path(f).parent) for f in files]))
                cases.append(Case(unique(p.name if one else _series_name(s)), p if one else folder, "dicom",
                                  () if one else tuple(files), "" if s.uid.startswith("(") else s.uid,
                                  _series_label(s.heads[0][1]), _skip_reason(s, min_slices)))
            for folder, bad, first in unreadable:
                cases.append(Case(unique(f"{_safe(folder.name, 48) or 'folder'}_unreadable"), folder, "dicom",
                                  skipped=f"unreadable: {len(bad)} file(s) not readable as DICOM ({first})"))
            found = [(q, _file_kind(q)) for q in sorted(p.iterdir()) if q.is_file() and not q.name.startswith(".")]
            found = [(q, k) for q, k in found if k in ("volume", "2d")]
            if not found and not series and not unreadable:
                problems.append((str(p), f"folder {p} holds no DICOM series and no NIfTI/PNG/JPG/NPY file"))
            for q, k in found:
                add(q, k)
        else:
            k = _file_kind(p)
            add(p, k or "volume")  # unknown extension: let io.read_image say what it is
    return cases, problems


def _intensity_for(case: Case, requested: str) -> str:
    if requested != "auto":
        return requested
    low = case.path.name.lower()
    if case.kind == "2d" and low.endswith(PICTURE_SUFFIXES):
        return "8bit-auto"
    if low.endswith(".npy"):
        arr = np.load(case.path, mmap_mode="r", allow_pickle=False)
        if arr.dtype == np.uint8 or (arr.size and float(arr.min()) >= 0 and float(arr.max()) <= 255):
            return "8bit-auto"
    return "hu"


def display_slices(img, label, k: int = 3):
    """LPS-oriented (radiological display) window [0,1] slices with the most infection (else lung)."""
    import SimpleITK as sitk


    a = window(sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")))
    lab = sitk.GetArrayFromImage(sitk.DICOMOrient(label, "LPS"))
    inf = (lab == 2).reshape(len(lab), -1).sum(1)
    lung = (lab > 0).reshape(len(lab), -1).sum(1)
    score = inf * 1e6 + lung if inf.any() else lung
    order = [int(z) for z in np.argsort(score)[::-1][:k] if score[z] > 0] or [len(lab) // 2]
    return [(a[z], lab[z], z) for z in sorted(order)]


def _write_2d_label(arr2d: np.ndarray, path: Path) -> None:
    if path.suffix == ".npy":
        np.save(path, arr2d.astype(np.uint8))
    else:
        from PIL import Image

        Image.fromarray(arr2d.astype(np.uint8), mode="L").save(path)


def _write_dicom_seg(case: Case, label, report: dict, out_dir: Path) -> tuple:
    """``<case>_seg.dcm`` beside the NIfTI label for a DICOM input -> (file name or None, note)."""

    if case.kind != "dicom":
        return None, "not written: the input is not a DICOM series"
    try:
        path = write_dicom_seg(label, list(case.files) if case.files else case.path, out_dir / f"{case.name}_seg.dcm",
                               model_version=str(report.get("model_version") or "") or None,
                               series_description=call_series_description(
                                   (report.get("classification") or {}).get("label")))
    except InputError as e:
        return None, f"not written: {' '.join(str(e).split())}"
    return path.name, ""


def predict_case(predictor, case: Case, out_dir: Path, intensity: str = "auto", overlays: int = 3,
                 formats=("nifti",)) -> dict:
    """Run one case; write label, JSON report and overlay; return the summary row. ``formats`` with
    "dicom-seg": a DICOM input also gets ``<case>_seg.dcm`` (DICOM-SEG referencing its series)."""
    import SimpleITK as sitk


    inten = _intensity_for(case, intensity)
    img = read_image(list(case.files) if case.files else case.path, intensity=inten)
    label, report = predictor.predict(img)
    is_2d = case.kind == "2d" and img.GetSize()[2] == 1
    if is_2d:
        ext = ".npy" if case.path.name.lower().endswith(".npy") else ".png"
        label_path = out_dir / f"{case.name}_label{ext}"
        _write_2d_label(sitk.GetArrayFromImage(label)[0], label_path)
    else:
        label_path = out_dir / f"{case.name}_label.nii.gz"
        write_image(label, label_path)
    seg_name, seg_note = _write_dicom_seg(case, label, report, out_dir) if "dicom-seg" in formats else (None, "")
    if seg_note:
        log.warning("%s: DICOM-SEG %s", case.name, seg_note)
    overlay_path = None
    if overlays:
        panels = [(s, lab, f"{case.name}  slice {z}") for s, lab, z in display_slices(img, label, overlays)]
        overlay_path = overlay_panels(panels, out_dir / f"{case.name}_overlay.png")
    report = dict(report)
    report.update({"case": case.name, "input": str(case.path), "kind": case.kind, "intensity": inten,
                   "size": list(img.GetSize()), "spacing": list(img.GetSpacing()),
                   "outputs": {"label": label_path.name, "overlay": overlay_path.name if overlay_path else None}})
    if case.series_uid:
        report.update(series_uid=case.series_uid, series=case.series, files=len(case.files) or None)
    if "dicom-seg" in formats:
        report["outputs"].update(dicom_seg=seg_name, dicom_seg_note=seg_note)
    if "report" in formats:  # one page a clinician reads (hybrid_ct.predict.pdf_report)

        pdf, _ = write_scan_report(display_slices(img, label, 3), report, case.name, out_dir / f"{case.name}_report.pdf")
        report["outputs"]["report"] = pdf.name
    with open(out_dir / f"{case.name}.json", "w") as f:
        json.dump(jsonable(report), f, indent=2)
    c, b, e = report["classification"], report["burden"], report["energy"]
    return {"case": case.name, "input": str(case.path), "kind": case.kind, "status": "ok", "error": "",
            "class": c["label"], "probability": round(float(c["probability"]), 4),
            "burden_total_pct": round(float(b["total_pct"]), 3), "burden_left_pct": round(float(b["left_pct"]), 3),
            "burden_right_pct": round(float(b["right_pct"]), 3), "grade": report["grade"],
            "energy_ratio": round(float(e["ratio"]), 4), "mean_firing_rate": round(float(e["mean_firing_rate"]), 4),
            "latency_s": round(float(report["latency_s"]), 3), "label_file": label_path.name,
            "series_uid": case.series_uid}


SUMMARY_FIELDS = ["case", "input", "kind", "status", "error", "class", "probability", "burden_total_pct",
                  "burden_left_pct", "burden_right_pct", "grade", "energy_ratio", "mean_firing_rate", "latency_s",
                  "label_file", "series_uid"]


def write_summary(rows: list, path) -> None:
    """``summary.csv``: one row per case or skipped series, SUMMARY_FIELDS columns."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
