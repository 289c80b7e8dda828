"""One page per scan a clinician can read: the call, the burden per lung, the grade, the three most affected
slices with the outlines, the model version and the caveats (research use, data licences). Written as a
one-page PDF (and a PNG of the same page to look at) with matplotlib's Agg backend (no display, no
browser, nothing downloaded)."""
from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hybrid_ct.contract import LABELS
from hybrid_ct.predict.overlays import INFECTION_COLOR, LUNG_COLOR, new_figure

CAVEAT = ("Research software, not a medical device: every outline and call must be checked by a radiologist. "
          "The model was trained on public data sets, some licensed for non-commercial use only "
          "(MedSeg, MosMed CC BY-NC-ND, UCSD COVID-CT); see the model card.")


def _lines(report: dict, case: str) -> list:
    c, b = report.get("classification", {}), report.get("burden", {})
    prob = c.get("probability")
    call = str(c.get("label", "n/a")).capitalize()
    if isinstance(prob, (int, float)):
        call += f" (P(positive) = {prob:.2f})" if c.get("calibrated") else f" (score {prob:.2f}, not calibrated)"
    pct = {k: b.get(k) for k in ("total_pct", "left_pct", "right_pct")}
    burden = ("n/a" if pct["total_pct"] is None else
              f"{pct['total_pct']:.1f} % of lung (left {pct['left_pct']:.1f} %, right {pct['right_pct']:.1f} %)")
    rows = [("Scan", case), ("Call", call)]
    if c.get("call_text"):  # the combined answer in the contract's words
        rows.append(("Answer", c["call_text"]))
    rows += [("Finding", c.get("finding", "n/a")), ("Infection burden", burden),
             ("Severity grade", report.get("grade", "n/a"))]
    if c.get("meaning"):
        rows.append(("A positive call means", c["meaning"]))
    density = report.get("lung_density") or {}
    if isinstance(density.get("median_hu"), (int, float)):
        text = f"median {density['median_hu']:.0f} HU (validated up to {density.get('max_median_hu', -750):.0f} HU)"
        if density.get("warning"):
            text += f" - WARNING: {density['warning']}"
        if density.get("note"):  # the standardisation applied before the network
            text += f" ({density['note']})"
        rows.append(("Lung parenchyma", text))
    return rows + [("Model version", report.get("model_version", "n/a")),
                   ("Written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]


def write_scan_report(slices: list, report: dict, case: str, out_pdf) -> tuple:
    """``slices``: up to three (window [0, 1] 2D image, label 2D, slice index) as ``batch.display_slices``
    gives them. Writes ``out_pdf`` (A4 portrait, one page) and a PNG beside it; returns both paths."""
    fig = new_figure(8.27, 11.69)
    fig.text(0.06, 0.96, "Hybrid CT: chest CT report", fontsize=16, weight="bold", va="top")
    y = 0.91
    for field, value in _lines(report, case):
        fig.text(0.06, y, f"{field}:", fontsize=10, weight="bold", va="top")
        text = textwrap.fill(str(value), 70)
        fig.text(0.30, y, text, fontsize=10, va="top")
        y -= 0.03 + 0.016 * text.count("\n")
    fig.text(0.06, y - 0.01, "Most affected slices (lung outlined in tan, infection in yellow)", fontsize=10,
             weight="bold", va="top")
    n = max(1, min(3, len(slices)))
    for i, (img, lab, z) in enumerate(slices[:3]):
        ax = fig.add_axes([0.04 + i * (0.92 / n), 0.18, 0.92 / n - 0.02, y - 0.24])
        ax.imshow(np.clip(np.asarray(img, float), 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        lab = np.asarray(lab)
        for value, color in ((LABELS["lung"], LUNG_COLOR), (LABELS["infection"], INFECTION_COLOR)):
            m = lab >= value if value == LABELS["lung"] else lab == value
            if m.any() and not m.all():
                ax.contour(m.astype(float), levels=[0.5], colors=[color], linewidths=1.0)
        ax.set_title(f"slice {z}", fontsize=9)
        for x, side in ((0.02, "R"), (0.93, "L")):  # radiological view: the patient's right on the left
            ax.text(x, 0.95, side, color="white", fontsize=9, weight="bold", transform=ax.transAxes, va="top")
        ax.set_axis_off()
    fig.text(0.06, 0.12, textwrap.fill(CAVEAT, 110), fontsize=8, va="top", style="italic")
    out_pdf = Path(out_pdf)
    out_pdf.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_pdf)
    png = out_pdf.with_suffix(".png")
    fig.savefig(png, dpi=80)
    return out_pdf, png
