"""Batch prediction: inputs (files, DICOM folders, folders of files) -> cases -> label, JSON report and
overlay per case, plus ``summary.csv`` (what ``hybrid-ct predict`` runs).

    cases, problems = expand_inputs(["scan.nii.gz", "dicom_dir/", "slices/"])
    rows = predict_batch(Predictor.from_checkpoint(default_model_path()), ["scan.nii.gz"], "results/")
"""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .report import jsonable

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


def _is_dicom_folder(folder: Path) -> bool:
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


def expand_inputs(inputs) -> tuple:
    """Paths -> (cases, problems). A folder holding a DICOM series is one case; any other folder
    contributes each readable file in it (not recursive) as its own case."""
    cases, problems, names = [], [], set()

    def add(path: Path, kind: str):
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", _strip_ext(path.name)) or "case"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        cases.append(Case(name, path, kind))

    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            problems.append((str(p), f"no such file or folder: {p}"))
        elif p.is_dir():
            if _is_dicom_folder(p):
                add(p, "dicom")
                continue
            found = [(q, _file_kind(q)) for q in sorted(p.iterdir()) if q.is_file() and not q.name.startswith(".")]
            found = [(q, k) for q, k in found if k]
            if not found:
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

    from .preprocess import window

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
    from .dicom_seg import write_dicom_seg

    if case.kind != "dicom":
        return None, "not written: the input is not a DICOM series"
    try:
        path = write_dicom_seg(label, case.path, out_dir / f"{case.name}_seg.dcm",
                               model_version=str(report.get("model_version") or "") or None)
    except InputError as e:
        return None, f"not written: {' '.join(str(e).split())}"
    return path.name, ""


def predict_case(predictor, case: Case, out_dir: Path, intensity: str = "auto", overlays: int = 3,
                 formats=("nifti",)) -> dict:
    """Run one case; write label, JSON report and overlay; return the summary row. ``formats`` with
    "dicom-seg": a DICOM input also gets ``<case>_seg.dcm`` (DICOM-SEG referencing its series)."""
    import SimpleITK as sitk

    from .io import read_image, write_image
    from .plots import overlay_panels

    inten = _intensity_for(case, intensity)
    img = read_image(case.path, intensity=inten)
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
    if "dicom-seg" in formats:
        report["outputs"].update(dicom_seg=seg_name, dicom_seg_note=seg_note)
    with open(out_dir / f"{case.name}.json", "w") as f:
        json.dump(jsonable(report), f, indent=2)
    c, b, e = report["classification"], report["burden"], report["energy"]
    return {"case": case.name, "input": str(case.path), "kind": case.kind, "status": "ok", "error": "",
            "class": c["label"], "probability": round(float(c["probability"]), 4),
            "burden_total_pct": round(float(b["total_pct"]), 3), "burden_left_pct": round(float(b["left_pct"]), 3),
            "burden_right_pct": round(float(b["right_pct"]), 3), "grade": report["grade"],
            "energy_ratio": round(float(e["ratio"]), 4), "mean_firing_rate": round(float(e["mean_firing_rate"]), 4),
            "latency_s": round(float(report["latency_s"]), 3), "label_file": label_path.name}


SUMMARY_FIELDS = ["case", "input", "kind", "status", "error", "class", "probability", "burden_total_pct",
                  "burden_left_pct", "burden_right_pct", "grade", "energy_ratio", "mean_firing_rate", "latency_s",
                  "label_file"]


def predict_batch(predictor, inputs, out_dir, intensity: str = "auto", overlays: int = 3, progress: bool = True,
                  on_error=None, formats=("nifti",)) -> list:
    """Predict every case of ``inputs`` (see ``expand_inputs``) into ``out_dir``; one bad case does not stop
    the batch. Writes ``summary.csv`` and returns its rows: ``status`` "ok", "refused" (the input cannot be
    read as a chest CT: ``io.read_image`` / ``io.check_ct`` raised InputError; ``error`` says why) or
    "error" (an unexpected failure). ``on_error(message)`` is told about each such input (default: logged)."""
    from tqdm import tqdm

    on_error = on_error or log.error
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases, problems = expand_inputs(inputs)
    rows = [{"case": Path(p).name, "input": p, "status": "refused", "error": msg} for p, msg in problems]
    for p, msg in problems:
        on_error(msg)
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress or len(cases) < 2):
        try:
            row = predict_case(predictor, case, out_dir, intensity, overlays, formats)
            log.info("%s: %s p=%.3f burden %.2f %% %s", case.name, row["class"], row["probability"],
                     row["burden_total_pct"], row["grade"])
        except InputError as e:  # the input's problem (unreadable, not a chest, not axial...): refused
            msg = " ".join(str(e).split())
            if "not a chest" in msg:
                msg += " (--no-chest-check skips this check)"
            on_error(f"{case.path}: {msg}")
            row = {"case": case.name, "input": str(case.path), "kind": case.kind, "status": "refused", "error": msg}
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the batch
            msg = f"{e.__class__.__name__}: {' '.join(str(e).split())}"
            log.debug("traceback", exc_info=True)
            on_error(f"{case.path}: {msg}")
            row = {"case": case.name, "input": str(case.path), "kind": case.kind, "status": "error", "error": msg}
        rows.append(row)
    write_summary(rows, out_dir / "summary.csv")
    return rows


def write_summary(rows: list, path) -> None:
    """``summary.csv``: one row per case, SUMMARY_FIELDS columns."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
