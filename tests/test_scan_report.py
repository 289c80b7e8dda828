"""The per-scan report: one A4 page (PDF) with the call, the burden per lung, the grade, the finding, the
three most affected slices, the model version and the caveat; a PNG of the same page to look at."""
from __future__ import annotations

import re

import SimpleITK as sitk

from hybrid_ct.predict.batch import display_slices
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.predict.pdf_report import CAVEAT, _lines, write_scan_report


def test_one_page_with_the_call_burden_grade_and_slices(tmp_path):
    img, lab, _ = make_phantom(3, shape=(16, 96, 96), positive=True)
    report = {"classification": {"label": "positive", "probability": 0.81, "calibrated": False,
                                 "finding": "infection outlined: 12.0 mL in 2 lesion(s)"},
              "burden": {"total_pct": 4.2, "left_pct": 3.0, "right_pct": 5.5}, "grade": "CT-1",
              "model_version": "hybrid-ct-test"}
    pdf, png = write_scan_report(display_slices(img, sitk.Cast(lab, sitk.sitkUInt8)), report, "phantom 3",
                                 tmp_path / "phantom3_report.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page[^s]", data)) == 1
    assert png.is_file() and png.stat().st_size > 10_000
    text = dict(_lines(report, "phantom 3"))
    assert text["Call"] == "Positive (score 0.81, not calibrated)"
    assert text["Infection burden"] == "4.2 % of lung (left 3.0 %, right 5.5 %)"
    assert text["Finding"].startswith("infection outlined") and text["Severity grade"] == "CT-1"
    assert "non-commercial" in CAVEAT


def test_the_combined_answer_and_the_density_warning_are_on_the_page(tmp_path):
    from hybrid_ct.contract import REPORT

    img, lab, _ = make_phantom(3, shape=(16, 96, 96), positive=True)
    call = REPORT["call"]
    report = {"classification": {"label": "indeterminate", "probability": 0.31, "calibrated": False,
                                 "finding": "infection outlined: 900.0 mL in 4 lesion(s)",
                                 "call_text": call["text"]["indeterminate_outlined"], "meaning": call["meaning"]},
              "burden": {"total_pct": 40.0, "left_pct": 41.0, "right_pct": 39.0}, "grade": "CT-2",
              "model_version": "hybrid-ct-test",
              "lung_density": {"median_hu": -690.0, "max_median_hu": -750.0,
                               "warning": REPORT["lung_density"]["warning"], "level_hu": -702.5, "shift_hu": 175.0,
                               "note": REPORT["lung_density"]["standardise"]["note"].format(shift=175.0)}}
    text = dict(_lines(report, "dense"))
    assert "175 HU denser than in training" in text["Lung parenchyma"]
    assert text["Call"].startswith("Indeterminate") and text["Answer"] == call["text"]["indeterminate_outlined"]
    assert "-690 HU" in text["Lung parenchyma"] and REPORT["lung_density"]["warning"] in text["Lung parenchyma"]
    assert "not specific to COVID-19" in text["A positive call means"]
    pdf, _ = write_scan_report(display_slices(img, sitk.Cast(lab, sitk.sitkUInt8)), report, "dense", tmp_path / "d.pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    del report["lung_density"]  # an older server's report: no density row
    assert "Lung parenchyma" not in dict(_lines(report, "old"))
