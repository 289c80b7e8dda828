"""The shipped model's outputs on the reference inputs, as fingerprints: did a refactor change what a user gets?

    python benchmarks/reference_outputs.py --out runs/ref --write docs/reference_outputs.json   # record
    python benchmarks/reference_outputs.py --out runs/ref --check docs/reference_outputs.json   # compare (exit 1)

Reference inputs (those present under ../shared/data): COVID-CT-MD P001 and normal001 (DICOM), cap001 and
NSCLC LUNG1-001 (HU NIfTI), imlab id001 (128 x 128 x 64) and MedSeg picture 0.jpg (8-bit). Each case is run
through ``hybrid-ct predict``'s own path (``predict_batch``); the fingerprint is the sha256 of the label
array (voxels only, not the file's bytes) and the report's call, probability, burden and grade.

``label_sha256`` is taken with the lung sides merged back into unsided lung (right and left lung -> 1, the
network's own output before the derived head ``lung_sides``), so it compares with fingerprints recorded before
the split; ``sided_label_sha256`` is the label as written, sides included.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hybrid_ct.contract import LABELS, SIDES

CASES = ("volumes_covid_ct_md/P001", "volumes_covid_ct_md/normal001", "volumes_hu/covidctmd_cap001/image_hu.nii.gz",
         "volumes_hu/nsclc_lung1_001/image_hu.nii.gz", "lung3d_imlab/id001_image_hu.nii.gz",
         "seg2d_medseg/images/0.jpg")
REPORT_FIELDS = (("classification", "label"), ("classification", "probability"), ("burden", "total_pct"),
                 ("burden", "left_pct"), ("burden", "right_pct"), ("grade",))


def fingerprints(out_dir: Path) -> dict:
    """Case name -> fingerprint, from the outputs of ``hybrid-ct predict`` in ``out_dir``."""
    result = {}
    for js in sorted(out_dir.glob("*.json")):
        report = json.loads(js.read_text())
        report = report.get("report", report)
        label = next((p for p in (out_dir / f"{js.stem}_label.nii.gz", out_dir / f"{js.stem}_label.png") if p.is_file()),
                     None)
        if label is None:
            continue
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
        merged = np.where(np.isin(arr, list(SIDES.values())), LABELS["lung"], arr).astype(arr.dtype)
        entry = {"label_sha256": hashlib.sha256(np.ascontiguousarray(merged).tobytes()).hexdigest(),
                 "sided_label_sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
                 "label_shape": list(arr.shape)}
        for path in REPORT_FIELDS:
            v = report
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            entry[".".join(path)] = v
        result[js.stem] = entry
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the predictions")
    ap.add_argument("--data", default=None, help="the real data folder (default: ../shared/data)")
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--from-folder", action="store_true", help="fingerprint the outputs already in --out")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", help="write the fingerprints to this JSON")
    g.add_argument("--check", help="compare with the fingerprints in this JSON; exit 1 on any difference")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.from_folder:
        from hybrid_ct.data.manifest import data_root
        from hybrid_ct.net.model_files import default_model_path
        from hybrid_ct.predict.predictor import Predictor
        from hybrid_ct.predict.runner import predict_batch

        root = data_root(args.data)
        inputs = [str(root / c) for c in CASES if (root / c).exists()]
        if not inputs:
            print(f"no reference input under {root}", file=sys.stderr)
            return 2
        predictor = Predictor.from_checkpoint(args.model or default_model_path())
        predict_batch(predictor, inputs, out, overlays=0, progress=True)
    got = fingerprints(out)
    if args.write:
        Path(args.write).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"{len(got)} fingerprints -> {args.write}")
        return 0
    want = json.loads(Path(args.check).read_text())
    bad = [f"{case}: {k} {want[case].get(k)!r} -> {got[case].get(k)!r}" for case in want if case in got
           for k in want[case] if want[case][k] != got[case].get(k)]
    missing = sorted(set(want) - set(got))
    for line in bad:
        print("DIFFERS", line)
    print(f"{len(want) - len(missing)} of {len(want)} reference cases compared, {len(bad)} difference(s)"
          + (f"; not run: {missing}" if missing else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
