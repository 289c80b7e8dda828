"""Synthetic lesions (hybrid_ct.data.lesions) next to real infected slices, and HU histograms inside lesions.

    PYTHONPATH=lib python scripts/lesion_montage.py --out docs/img_lesions

Writes ``montage.png`` (rows: lesions synthesised in 3D into NSCLC LUNG1-001's lungs (expert contours, outside the
tumour) without and with their masks; the same on the 128-pixel model slices the trainer sees (``lesion_slice``);
COVID-CT-MD P001's infected slices (radiologist's slice labels) with the shipped model's infection outline; MedSeg
pictures with their expert masks -- all on the network's window) and ``histograms.png`` (HU inside synthetic
ground glass / consolidation, inside the shipped model's outline on P001's infected slices, inside MedSeg's expert
masks (8-bit pictures mapped to HU by ``imaging.calibrate_8bit``: approximate), and LUNG1-001's normal parenchyma).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from hybrid_ct.data.lesions import lesion_slice, synthesize, to_hu  # noqa: E402
from hybrid_ct.data.manifest import data_root, read_slice_labels  # noqa: E402
from hybrid_ct.imaging.calibration import calibrate_8bit  # noqa: E402
from hybrid_ct.imaging.reader import read_image  # noqa: E402
from hybrid_ct.processing.grid import WINDOW_HU  # noqa: E402

COLS = 5


def crop(a, m, margin=12):
    ys, xs = np.nonzero(m)
    return a[max(ys.min() - margin, 0):ys.max() + margin, max(xs.min() - margin, 0):xs.max() + margin]


def show(ax, hu, mask=None, color="yellow", title=""):
    ax.imshow(hu, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], interpolation="nearest")
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), [0.5], colors=[color], linewidths=0.7)
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def synthetic_lung1(root: Path, seeds):
    img = read_image(root / "volumes_hu/nsclc_lung1_001/image_hu.nii.gz")
    hu = sitk.GetArrayFromImage(img).astype(np.float32)
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "volumes_hu/nsclc_lung1_001/lung_lr.nii.gz"))) > 0
    sp = img.GetSpacing()[::-1]
    out = []
    for s in seeds:
        syn, mask, foci = synthesize(hu, lung, s, sp, inferior_axis=0)
        out.append((syn, mask, foci))
    return hu, lung, sp, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/img_lesions")
    ap.add_argument("--data", default=None)
    args = ap.parse_args(argv)
    root, out = data_root(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hist = {}

    # synthetic, 3D, in LUNG1-001's real lungs
    hu, lung, sp, syn = synthetic_lung1(root, seeds=(0, 1, 2, 3, 4, 5))
    picks = []
    for syn_hu, mask, foci in syn:
        for f in sorted(foci, key=lambda f: -f.voxels)[:2]:
            if f.voxels:
                picks.append((syn_hu, mask, f))
    picks = picks[:COLS]
    for kind in ("ggo", "consolidation", "crazy_paving"):  # one synthesis per kind for the histograms
        s_hu, m, _ = synthesize(hu, lung, 100, sp, kinds=(kind,), n_foci=6, inferior_axis=0)
        hist[f"synthetic {kind} (LUNG1-001)"] = s_hu[m]
    hist["normal parenchyma (LUNG1-001)"] = hu[lung][::20]

    # real: P001's infected slices with the shipped model's outline
    from hybrid_ct.net.model_files import default_model_path
    from hybrid_ct.predict.predictor import Predictor

    p001 = read_image(root / "volumes_covid_ct_md/P001")
    label, _ = Predictor.from_checkpoint(default_model_path()).predict(p001)
    lab = sitk.GetArrayFromImage(label)
    phu = sitk.GetArrayFromImage(p001).astype(np.float32)
    truth = read_slice_labels(root / "volumes_covid_ct_md/P001_slice_labels.csv")
    infected = [z for z, v in sorted(truth.items()) if v and z < len(lab)]
    area = {z: int((lab[z] == 2).sum()) for z in infected}
    best = sorted(infected, key=lambda z: -area[z])[:COLS]
    sel = np.zeros(len(lab), bool)
    sel[infected] = True
    hist["P001 infected slices, inside the model's outline"] = phu[sel][lab[sel] == 2]

    # real: MedSeg pictures with expert masks
    from PIL import Image

    med = []
    for i in range(50):
        p = root / f"seg2d_medseg/images/{i}.jpg"
        m = root / f"seg2d_medseg/infection_mask/{i}.png"
        if p.is_file() and m.is_file():
            g = np.asarray(Image.open(p).convert("L"), np.float32)
            mk = np.asarray(Image.open(m).convert("L")) > 127
            if mk.shape == g.shape:
                med.append((np.rot90(calibrate_8bit(g), -1), np.rot90(mk, -1)))
    hist["MedSeg expert masks (8-bit, approximate HU)"] = np.concatenate([h[m] for h, m in med])
    med = sorted(med, key=lambda t: -t[1].sum())[::6][:COLS]

    # the model slices the trainer sees: 2D lesions on LUNG1-001's 128-pixel slices
    from hybrid_ct.data.wholescans import load_scan

    part, _ = load_scan(root, "nsclc_lung1_001", 128)
    lungs = (part.lung == 1).reshape(len(part), -1).mean(1)
    idx = np.flatnonzero(lungs > 0.08)[:: max(1, len(np.flatnonzero(lungs > 0.08)) // COLS)][:COLS]
    rng = np.random.default_rng(0)
    model_rows = [(lesion_slice(part.images[i] / 255.0, part.lung[i] == 1, rng)) for i in idx]

    fig, axes = plt.subplots(5, COLS, figsize=(COLS * 2.6, 5 * 2.7))
    for c in range(COLS):
        if c < len(picks):
            syn_hu, mask, f = picks[c]
            z = f.centre[0]
            show(axes[0, c], crop(syn_hu[z], lung[z]), title=f"synthetic {f.kind}, {2 * f.radius_mm:.0f} mm")
            show(axes[1, c], crop(syn_hu[z], lung[z]), crop(mask[z], lung[z]), title="with its exact mask")
        if c < len(model_rows):
            x, m = model_rows[c]
            show(axes[2, c], to_hu(x), m.astype(bool), title="128-px model slice (training)")
        if c < len(best):
            z = best[c]
            body = phu[z] > -500
            show(axes[3, c], crop(phu[z], body, 0), crop(lab[z] == 2, body, 0), color="red", title=f"P001 z {z} (real)")
        if c < len(med):
            h, m = med[c]
            show(axes[4, c], h, m, color="red", title="MedSeg (real, 8-bit)")
    for r in range(5):
        for c in range(COLS):
            if not axes[r, c].images:
                axes[r, c].set_axis_off()
    fig.suptitle("Synthetic lesions in real lungs (rows 1-3) and real COVID-19 infection (rows 4-5); "
                 f"window {WINDOW_HU[0]:.0f}..{WINDOW_HU[1]:.0f} HU", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "montage.png", dpi=80)
    from PIL import Image as _Image  # a palette PNG: a quarter of the bytes, the same picture to the eye

    _Image.open(out / "montage.png").convert("RGB").quantize(96).save(out / "montage.png", optimize=True)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    bins = np.linspace(-1050, 200, 90)
    stats = {}
    for name, v in hist.items():
        v = np.asarray(v, float)
        ax.hist(v, bins, density=True, histtype="step", lw=1.6 if "synthetic" not in name else 1.2,
                ls="--" if "normal" in name else "-", label=f"{name} (median {np.median(v):.0f})")
        stats[name] = {"voxels": int(v.size), "median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
                       "p90": float(np.percentile(v, 90))}
    ax.set_xlabel("HU")
    ax.set_ylabel("density")
    ax.set_title("HU inside lesions: synthetic against real")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "histograms.png", dpi=90)
    (out / "histograms.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
