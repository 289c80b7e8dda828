"""Does the network need every slice of a thin series? The shipped model on real whole scans, once on every
slice and once with ``Predictor(z_step_mm=...)`` (the network on slices that far apart, the rest
interpolated): agreement of the labels and the report, network slices and time.

    python benchmarks/thin_slices.py --steps 4 6 --json runs/thin_slices.json

The real series here are 2 mm (COVID-CT-MD P001, normal001, cap001) and 2.5-3 mm (LUNG1-001): a 4 mm step
skips every second slice, a wider gap than a 2.5 mm step leaves on a 1.25 mm series. Thin (1.25 mm) real
series are not in ../shared/data; the judgement on them is by that argument, not measured.
Times are of this machine as it is (the table says its load): compare within one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {"P001": "volumes_covid_ct_md/P001", "normal001": "volumes_covid_ct_md/normal001",
         "cap001": "volumes_hu/covidctmd_cap001/image_hu.nii.gz",
         "LUNG1-001": "volumes_hu/nsclc_lung1_001/image_hu.nii.gz"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def compare(ref: tuple, other: tuple) -> dict:
    (la, ra), (lb, rb) = ref, other
    a, b = sitk.GetArrayViewFromImage(la), sitk.GetArrayViewFromImage(lb)
    vox_ml = float(np.prod(la.GetSpacing())) / 1000.0
    ca, cb = ra["classification"], rb["classification"]
    return {"lung_dice": round(dice(a > 0, b > 0), 4), "infection_dice": round(dice(a == 2, b == 2), 4),
            "infection_ml": [round(float((a == 2).sum()) * vox_ml, 1), round(float((b == 2).sum()) * vox_ml, 1)],
            "burden_pct": [ra["burden"]["total_pct"], rb["burden"]["total_pct"]],
            "call": [ca["label"], cb["label"]], "probability": [round(ca["probability"], 3), round(cb["probability"], 3)],
            "grade": [ra["grade"], rb["grade"]], "slices_run": [ra["slices_run"], rb["slices_run"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=float, nargs="+", default=[4.0, 6.0], help="z_step_mm values to compare")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    if not (SHARED / "MANIFEST.csv").is_file():
        print(f"real data not found at {SHARED}", file=sys.stderr)
        return 2
    from hybrid_ct.imaging.reader import read_image
    from hybrid_ct.net.model_files import default_model_path
    from hybrid_ct.predict.predictor import Predictor

    rows = []
    for name in args.cases:
        image = read_image(str(SHARED / CASES[name]))
        runs = {}
        for step in [None] + list(args.steps):
            predictor = Predictor.from_checkpoint(default_model_path(), z_step_mm=step)
            t = time.perf_counter()
            runs[step] = predictor.predict(image)
            runs[step] = runs[step] + (time.perf_counter() - t,)
        for step in args.steps:
            row = {"case": name, "slice_mm": round(image.GetSpacing()[2], 2), "z_step_mm": step,
                   **compare(runs[None][:2], runs[step][:2]),
                   "seconds": [round(runs[None][2], 1), round(runs[step][2], 1)]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load_avg": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
