"""Render what the Slicer module shows after "Run": a real chest CT with the Lung and Infection
segments in the extension's colours, beside the results panel with the module's own strings.

These are RENDERINGS, not Slicer screenshots (a Slicer application cannot be installed on the build
machines): every picture says so in its title, and carries the module's research-use notice.

Slicer cannot run on the build machines, so this uses the same pieces the module and the server use:
the server's model (`hybrid_ct.predict.predictor.Predictor`, the app's infer path) on a real series, and the
extension's Qt-free `hybrid_ct_slicer.segments` colours and `hybrid_ct_slicer.results` formatting.

    .venv/bin/python scripts/slicer_pictures.py                     # shipped model, COVID-CT-MD P001 + normal001
    .venv/bin/python scripts/slicer_pictures.py --model m.pt --case /path/to/dicom_or_nifti --out docs/images
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slicer_extension"))

from hybrid_ct.data.manifest import data_root  # noqa: E402
from hybrid_ct.predict.predictor import Predictor  # noqa: E402
from hybrid_ct.imaging.reader import read_image  # noqa: E402
from hybrid_ct.net.model_files import default_model_path  # noqa: E402
from hybrid_ct.predict.overlays import results_view  # noqa: E402
from hybrid_ct.processing.grid import WINDOW_HU  # noqa: E402
from hybrid_ct.files import jsonable  # noqa: E402
from hybrid_ct_slicer.panel import RESEARCH_NOTICE  # noqa: E402
from hybrid_ct_slicer.results import RESULT_FIELDS, format_results  # noqa: E402
from hybrid_ct_slicer.segments import LABEL_INFO  # noqa: E402


def render(predictor: Predictor, case: Path, out: Path) -> Path:
    image = read_image(str(case))
    label, report = predictor.predict(image)
    params = jsonable(report)
    values = format_results(params)
    lab = sitk.GetArrayFromImage(label)
    hu = sitk.GetArrayFromImage(image).astype(float)
    # the axial slice Slicer would be scrolled to: most infection, else most lung
    score = (lab == 2).sum((1, 2)) * 1000 + (lab >= 1).sum((1, 2))
    k = int(np.argmax(score))
    lo, hi = WINDOW_HU
    img = (hu[k] - lo) / (hi - lo)
    colors = {d["idx"]: d["color"] for d in LABEL_INFO}
    lines = [("Notice", RESEARCH_NOTICE)] + [(name, values[key]) for key, name in RESULT_FIELDS]
    name = case.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):  # a volume file: its name without the extension
        name = name[: -len(ext)] if name.endswith(ext) else name
    path = out / f"slicer_results_{name}.png"
    results_view(img, lab[k], colors, lines, path, title=f"RENDERING, not Slicer: {name}, slice "
                 f"{k + 1}/{lab.shape[0]}")
    (out / f"slicer_results_{name}.json").write_text(json.dumps(params, indent=1))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: $HYBRID_CT_MODEL, else the shipped model)")
    ap.add_argument("--case", action="append", help="DICOM folder or volume (repeatable)")
    ap.add_argument("--out", default=str(REPO / "docs" / "images"))
    args = ap.parse_args(argv)
    cases = [Path(c) for c in args.case] if args.case else [
        data_root(None) / "volumes_covid_ct_md" / n for n in ("P001", "normal001")]
    predictor = Predictor.from_checkpoint(args.model or default_model_path())
    out = Path(args.out)
    for case in cases:
        print(render(predictor, case, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
