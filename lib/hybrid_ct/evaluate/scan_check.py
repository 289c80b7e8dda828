"""``hybrid-ct scan-check``: the whole-scan call measured leave-one-scan-out, and the calibration fitted.

Validation scans: synthetic chest phantoms the model never trained on (seeds from ``PHANTOM_SEED``,
half with infection, a third with a table) and the whole HU scans of ``../shared/data`` with scan-level
truth: P001 (COVID-19), normal001 (normal), cap001 (pneumonia, not COVID-19: negative by truth) and
nsclc_lung1_001 (lung cancer, no infection); the imlab volumes (truth unknown) are reported only.
Each real scan's probability comes from a calibration fitted WITHOUT it (leave-one-scan-out); the noise
floor likewise comes from the other infection-free scans without a tumour. The calibration written
beside the checkpoint is then fitted on all of them. Output: a Markdown table and a reliability plot.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from hybrid_ct.data.manifest import data_root
from hybrid_ct.processing.scan_call import Calibration, calibration_path, decide, fit_calibration
from hybrid_ct.predict.predictor import Predictor
from hybrid_ct.imaging.reader import read_image
from hybrid_ct.data.phantom import make_phantom

PHANTOM_SEED = 5000  # training phantoms use seeds from 1000 (datasets.load_phantoms)
PHANTOM_SHAPE = (48, 192, 192)
REAL = {  # name: (path under the data root, COVID-19 truth, infection truth, lung reference mask)
    "P001": ("volumes_covid_ct_md/P001", 1, 1, None),
    "normal001": ("volumes_covid_ct_md/normal001", 0, 0, None),
    "cap001": ("volumes_hu/covidctmd_cap001/image_hu.nii.gz", 0, 1, None),
    "nsclc_lung1_001": ("volumes_hu/nsclc_lung1_001/image_hu.nii.gz", 0, 0, "volumes_hu/nsclc_lung1_001/lung_lr.nii.gz"),
    "imlab_id001": ("lung3d_imlab/id001_image_hu.nii.gz", None, None, "lung3d_imlab/id001_lungmask.nii.gz"),
    "imlab_id002": ("lung3d_imlab/id002_image_hu.nii.gz", None, None, "lung3d_imlab/id002_lungmask.nii.gz"),
}
TUMOUR = {"nsclc_lung1_001"}  # infection-free, but its tumour is a real finding: not a noise-floor sample


def _run(predictor: Predictor, img: sitk.Image, name: str, covid, infection, ref=None) -> dict:
    t0 = time.perf_counter()
    label, report = predictor.predict(img)
    arr = sitk.GetArrayFromImage(label)
    so = report["classification"]
    row = {"name": name, "covid": covid, "infection": infection, "score": so["score"],
           "infection_ml": so["infection_ml"], "lung_slices": so["lung_slices"], "burden_pct": report["burden"]["total_pct"],
           "seconds": round(time.perf_counter() - t0, 1)}
    if ref is not None:
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(ref))) > 0
        p = arr > 0
        vox_ml = float(np.prod(img.GetSpacing())) / 1000.0
        row.update(lung_dice=float(2 * (p & r).sum() / max(p.sum() + r.sum(), 1)),
                   false_lung_ml=float((p & ~r).sum() * vox_ml))
    return row


def collect(model, root=None, n_phantoms: int = 24, progress: bool = True) -> list:
    predictor = Predictor.from_checkpoint(model, calibration=Calibration())  # raw scores
    rows = []
    for i in tqdm(range(n_phantoms), desc="phantoms", disable=not progress):
        seed = PHANTOM_SEED + i
        img, _, info = make_phantom(seed, shape=PHANTOM_SHAPE, positive=i % 2 == 0, table=i % 3 == 0)
        pos = int(info["positive"])
        rows.append({**_run(predictor, img, f"phantom {seed}", pos, pos), "phantom": True})
    base = data_root(root)
    for name, (rel, covid, infection, ref) in tqdm(REAL.items(), desc="real scans", disable=not progress):
        path = base / rel
        if path.exists():
            rows.append({**_run(predictor, read_image(path), name, covid, infection,
                                base / ref if ref else None), "phantom": False})
    return rows


def _fit(rows: list, checkpoint=None) -> Calibration:
    known = [r for r in rows if r["covid"] is not None]
    negatives = [r["infection_ml"] for r in known if r["infection"] == 0 and r["name"] not in TUMOUR]
    return fit_calibration([r["score"] for r in known], [r["covid"] for r in known], negatives, checkpoint,
                           [r["name"] for r in known])


def leave_one_scan_out(rows: list) -> list:
    """Each real scan decided by a calibration fitted on every other scan."""
    out = []
    for r in rows:
        if r["phantom"]:
            continue
        cal = _fit([o for o in rows if o is not r])
        feats = {"score": r["score"], "infection_ml": r["infection_ml"], "lesions": 0, "lung_slices": r["lung_slices"]}
        out.append({**r, **{k: v for k, v in decide(feats, cal).items() if k in
                            ("label", "probability", "infection_found", "noise_floor_ml")}})
    return out


def reliability_plot(rows: list, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    known = [r for r in rows if r["covid"] is not None and "probability" in r]
    p = np.array([r["probability"] for r in known])
    y = np.array([r["covid"] for r in known])
    bins = np.linspace(0, 1, 6)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    centres, freq, counts = [], [], []
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (p >= lo) & (p < hi if hi < 1 else p <= hi)
        if m.any():
            centres.append(p[m].mean())
            freq.append(y[m].mean())
            counts.append(int(m.sum()))
    ax.plot(centres, freq, "o-", label="validation scans (held out)")
    for c, f, n in zip(centres, freq, counts):
        ax.annotate(f"n={n}", (c, f), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for r in known:
        if not r["phantom"]:
            ax.annotate(r["name"], (r["probability"], r["covid"]), fontsize=7, color="tab:red")
    ax.set(xlabel="calibrated probability of COVID-19", ylabel="observed share positive", xlim=(0, 1), ylim=(-0.05, 1.05),
           title="Scan-level call: reliability")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def held_out_phantoms(rows: list, folds: int = 4) -> list:
    """Phantom scans decided by calibrations fitted without their fold (for the reliability plot)."""
    ph = [r for r in rows if r["phantom"]]
    out = []
    for k in range(folds):
        test = ph[k::folds]
        cal = _fit([r for r in rows if r not in test])
        for r in test:
            out.append({**r, "probability": cal.probability(r["score"]) if cal.calibrated else r["score"]})
    return out


def render(loso: list, phantoms: list, cal: Calibration, plot_name: str, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Calibration fitted on all {len(cal.fitted_on)} validation scans (written beside the model only with "
             f"`--write-calibration`): P = sigmoid({cal.a:.3f} logit(score) + {cal.b:.3f}), noise floor "
             f"{cal.noise_floor_ml:.1f} mL.", "",
             "| scan | truth COVID-19 / infection | score (mean slice P) | raw call (score >= 0.5) | calibrated call "
             "(held out) | P (held out) | infection mL | floor mL (held out) | found | lung Dice 3D | false lung mL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in loso:
        truth = "?" if r["covid"] is None else f"{'pos' if r['covid'] else 'neg'} / {'yes' if r['infection'] else 'no'}"
        dice = f"{r['lung_dice']:.3f}" if "lung_dice" in r else ""
        false = f"{r['false_lung_ml']:.0f}" if "false_lung_ml" in r else ""
        raw = "positive" if r["score"] >= 0.5 else "negative"
        lines.append(f"| {r['name']} | {truth} | {r['score']:.3f} | {raw} | {r['label']} | {r['probability']:.3f} | "
                     f"{r['infection_ml']:.1f} | {r['noise_floor_ml']:.1f} | {'yes' if r['infection_found'] else 'no'} "
                     f"| {dice} | {false} |")
    acc = np.mean([(p["probability"] >= 0.5) == bool(p["covid"]) for p in phantoms]) if phantoms else float("nan")
    real = [r for r in loso if r["covid"] is not None]
    if real:
        right_cal = sum((r["probability"] >= 0.5) == bool(r["covid"]) for r in real)
        right_raw = sum((r["score"] >= 0.5) == bool(r["covid"]) for r in real)
        lines += ["", f"Real scans with scan-level truth (n = {len(real)}): calibrated call (held out) right on "
                  f"{right_cal}, raw call (score >= 0.5) right on {right_raw}."]
    neg_ml = [p["infection_ml"] for p in phantoms if not p["infection"]]
    lines += ["", f"Phantoms (n = {len(phantoms)}, 4 folds held out): call accuracy {acc:.3f}; infection outlined on "
              f"the {len(neg_ml)} negative phantoms: max {max(neg_ml, default=0):.2f} mL.", "",
              f"![reliability]({plot_name})"]
    return "\n".join(lines) + "\n"


def run_scan_check(model, out_md, root=None, n_phantoms: int = 24, write_calibration: bool = False,
                   command: str = "hybrid-ct scan-check") -> dict:
    rows = collect(model, root, n_phantoms)
    loso = leave_one_scan_out(rows)
    phantoms = held_out_phantoms(rows)
    cal = _fit(rows, model)
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    plot = out_md.with_suffix(".png")
    reliability_plot(loso + phantoms, plot)
    out_md.write_text(render(loso, phantoms, cal, plot.name, command), encoding="utf-8")
    (out_md.with_suffix(".json")).write_text(json.dumps({"rows": rows, "held_out": loso}, indent=1, default=float))
    if write_calibration:
        cal.save(calibration_path(model))
    return {"rows": rows, "held_out": loso, "calibration": cal}
