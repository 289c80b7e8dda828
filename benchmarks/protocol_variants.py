"""Robustness to scan protocol (issue 27, point 3) and COVID-19 against other pneumonia (point 4), measured on a model.

    python benchmarks/protocol_variants.py --json runs/protocol.json              # the shipped model
    python benchmarks/protocol_variants.py --model runs/x.pt --json runs/x_protocol.json
    python benchmarks/protocol_variants.py --cases normal001 --no-pneumonia       # quicker
    python benchmarks/protocol_variants.py --no-standardise --json runs/before.json  # without the density standardisation
    python benchmarks/protocol_variants.py --reference-hu -877.5 --json runs/real.json  # to the densest real volume
    python benchmarks/protocol_variants.py --lesion-load --json runs/load.json      # the level under growing lesions

Protocol: the infection-free scans normal001 (COVID-CT-MD) and LUNG1-001 (NSCLC-Radiomics) and their variants
(``hybrid_ct.data.protocol.VARIANTS``: parenchyma +100 / +200 HU -- inside the expert lung contours of LUNG1-001, the
model's own outline of normal001 --, a smooth kernel, 5 mm slices, low-dose noise), each through ``Predictor``: false
infection mL (3D lesions >= 0.5 mL, ``classification.infection_ml``), burden, grade, the combined call, the
classifier alone and the parenchyma's median HU with the report's warning. Target (issue 27): < 5 mL, CT-0, negative.

Pneumonia: P001 (COVID-19) and cap001 (community-acquired pneumonia, not COVID-19) with the radiologist's per-slice
infection labels: per scan the classifier's slice AUC (infected against clean slices), its mean probability on the
infected slices, and the share of infected slices with >= 50 mm^2 of outlined infection. If the classifier scores
cap001's infected slices like P001's, it does not tell COVID-19 from other pneumonia.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SCANS = {"normal001": ("volumes_covid_ct_md/normal001", None),
         "LUNG1-001": ("volumes_hu/nsclc_lung1_001/image_hu.nii.gz", "volumes_hu/nsclc_lung1_001/lung_lr.nii.gz")}
PNEUMONIA = {"P001": ("volumes_covid_ct_md/P001", "volumes_covid_ct_md/P001_slice_labels.csv"),
             "cap001": ("volumes_hu/covidctmd_cap001/image_hu.nii.gz", "volumes_hu/covidctmd_cap001/slice_labels.csv")}


def summary(report: dict) -> dict:
    c, d = report["classification"], report.get("lung_density") or {}
    return {"infection_ml": round(float(c.get("infection_ml", 0.0)), 1), "burden_pct": round(report["burden"]["total_pct"], 2),
            "grade": report["grade"], "call": c["label"], "classifier": c.get("classifier_label", c["label"]),
            "probability": round(float(c["probability"]), 3), "median_hu": d.get("median_hu"),
            "warning": bool(d.get("warning")), "level_hu": d.get("level_hu"), "shift_hu": d.get("shift_hu"),
            "latency_s": round(float(report["latency_s"]), 1)}


def protocol(predictor, root: Path, names) -> dict:
    from hybrid_ct.data.protocol import VARIANTS, variant
    from hybrid_ct.imaging.reader import read_image

    out = {}
    for name in names:
        rel, lung_rel = SCANS[name]
        img = read_image(root / rel)
        label, rep = predictor.predict(img)
        out[f"{name} original"] = summary(rep)
        print(name, "original", out[f"{name} original"], flush=True)
        lung = (sitk.GetArrayFromImage(sitk.ReadImage(str(root / lung_rel))) > 0) if lung_rel else \
            sitk.GetArrayFromImage(label) > 0
        for v in VARIANTS:
            _, rep = predictor.predict(variant(img, v, lung))
            out[f"{name} {v}"] = summary(rep)
            print(name, v, out[f"{name} {v}"], flush=True)
    return out


LESION_LOADS = ((5, (10, 30)), (20, (20, 50)), (25, (25, 55)), (30, (25, 60)), (35, (30, 65)), (80, (40, 90)))


def lesion_load(root: Path) -> dict:
    """Does a lung full of lesions pass for an expiration scan? Synthetic ground glass (``data.lesions``, seed 0)
    drawn into LUNG1-001's expert lungs in growing amounts (foci, radius mm): the share of the lung involved, the
    parenchyma level and the standardisation's shift (``processing.density``), without the network."""
    from hybrid_ct.data.lesions import synthesize
    from hybrid_ct.imaging.body import body_mask
    from hybrid_ct.imaging.reader import read_image
    from hybrid_ct.processing.density import parenchyma_level, standardise_shift

    rel, lung_rel = SCANS["LUNG1-001"]
    img = read_image(root / rel)
    hu = sitk.GetArrayFromImage(img)
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(root / lung_rel))) > 0
    body, sp = body_mask(img), tuple(reversed(img.GetSpacing()))
    out = {}
    for n, radius in LESION_LOADS:
        h, m, _ = synthesize(hu, lung, 0, spacing=sp, n_foci=n, kinds=("ggo",), inferior_axis=0, radius_mm=radius)
        level = parenchyma_level(h, body)
        out[f"{n} foci {radius[0]}-{radius[1]} mm"] = {"lung_involved": round(float(m.sum() / lung.sum()), 3),
                                                      "level_hu": level, "shift_hu": standardise_shift(level)}
        print("lesion load", n, radius, out[f"{n} foci {radius[0]}-{radius[1]} mm"], flush=True)
    return out


def auc(scores, truth) -> float | None:
    s, t = np.asarray(scores, float), np.asarray(truth, bool)
    if t.all() or not t.any():
        return None
    pos, neg = s[t], s[~t]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def pneumonia(predictor, root: Path) -> dict:
    from hybrid_ct.data.manifest import read_slice_labels
    from hybrid_ct.imaging.reader import read_image
    from hybrid_ct.processing.grid import make_context
    from hybrid_ct.processing.scan_call import SLICE_MIN_MM2

    out = {}
    for name, (rel, labels_rel) in PNEUMONIA.items():
        img = read_image(root / rel)
        label, rep = predictor.predict(img)
        lab = sitk.GetArrayFromImage(label)
        sp = label.GetSpacing()
        ctx = make_context(img, predictor.model.cfg.in_size)
        prob = np.asarray(rep["classification"]["slice_probability"], float)
        prob = prob[::-1] if 0 in ctx.flips else prob  # canonical order -> SimpleITK slice index
        truth = read_slice_labels(root / labels_rel)
        zs = np.array(sorted(z for z in truth if 0 <= z < len(lab)))
        t = np.array([truth[z] for z in zs], bool)
        lungs = (lab[zs] > 0).reshape(len(zs), -1).any(1)  # slices with lung in the outline
        inf_mm2 = (lab[zs] == 2).reshape(len(zs), -1).sum(1) * sp[0] * sp[1]
        seg = inf_mm2 >= SLICE_MIN_MM2
        keep = lungs
        out[name] = {**summary(rep), "infected_slices": int(t.sum()), "clean_lung_slices": int((~t & keep).sum()),
                     "classifier_slice_auc": auc(prob[zs][keep], t[keep]),
                     "classifier_mean_p_infected": round(float(prob[zs][t].mean()), 3) if t.any() else None,
                     "classifier_mean_p_clean": round(float(prob[zs][~t & keep].mean()), 3),
                     "classifier_sensitivity": round(float((prob[zs][t] >= 0.5).mean()), 3) if t.any() else None,
                     "classifier_specificity": round(float((prob[zs][~t & keep] < 0.5).mean()), 3),
                     "outline_sensitivity": round(float(seg[t].mean()), 3) if t.any() else None,
                     "outline_specificity": round(float((~seg[~t & keep]).mean()), 3)}
        print(name, out[name], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--data", default=None, help="the real data folder (default: ../shared/data)")
    ap.add_argument("--cases", default=",".join(SCANS), help="comma list of " + ", ".join(SCANS))
    ap.add_argument("--no-pneumonia", action="store_true", help="skip P001 / cap001")
    ap.add_argument("--lesion-load", action="store_true",
                    help="only the level of LUNG1-001 with growing synthetic ground glass (no network; lesion_load)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--no-standardise", action="store_true",
                    help="the scans' HU as they are: no density standardisation (processing.density; the 'before')")
    ap.add_argument("--reference-hu", type=float, default=None,
                    help="standardise to this parenchyma level instead of the contract's (a measured alternative)")
    args = ap.parse_args(argv)
    from hybrid_ct.data.manifest import data_root
    from hybrid_ct.net.model_files import default_model_path
    from hybrid_ct.predict.predictor import Predictor

    root = data_root(args.data)
    if args.lesion_load:
        res = {"lesion_load": lesion_load(root)}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        return 0
    model = args.model or default_model_path()
    std = False if args.no_standardise else (args.reference_hu if args.reference_hu is not None else True)
    predictor = Predictor.from_checkpoint(model, standardise=std)
    t0 = time.time()
    res = {"model": str(model), "standardise": std, "protocol": protocol(predictor, root, [c for c in args.cases.split(",") if c])}
    if not args.no_pneumonia:
        res["pneumonia"] = pneumonia(predictor, root)
    res["seconds"] = round(time.time() - t0)
    print("| scan | false infection mL | burden % | grade | call | classifier (P) | lung median HU | warning | level HU | shifted HU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, r in res["protocol"].items():
        hu = "n/a" if r["median_hu"] is None else f"{r['median_hu']:.0f}"
        print(f"| {k} | {r['infection_ml']:.1f} | {r['burden_pct']:.2f} | {r['grade']} | {r['call']} | "
              f"{r['classifier']} ({r['probability']:.2f}) | {hu} | {'yes' if r['warning'] else 'no'} | "
              f"{r.get('level_hu') or 'n/a'} | {r.get('shift_hu') or 0:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
