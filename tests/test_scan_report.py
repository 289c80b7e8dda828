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
