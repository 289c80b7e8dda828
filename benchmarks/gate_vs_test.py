"""Does the promotion gate measure what the campaign's test measures? Both on the same scans and models.

The gate scores a model with ``hybrid_ct.train.scoring.evaluate`` on 2D training slices (``slices_of``: the
network's output per slice, no 3D rule); the campaign's test runs the served product, ``Predictor`` (3D, the
lung and anatomy rules), and computes 3D Dice. In the campaign of 2026-12-07 22:23 (`random`, seed 0, round 2)
the gate saw infection Dice 0.67 -> 0.73 on a held-out phantom and promoted the retrain, while the test phantom's
infection Dice fell 0.52 -> 0.16. This scores each ``--models`` checkpoint both ways on the pool and test scans of
``--seed`` (the campaign's pools, ``al_pools.build_pools`` at the shipped scale) that ``--scans`` names.

    python benchmarks/gate_vs_test.py --models runs/al_final/random_s0/model/pretrained.pt \\
        runs/al_final/random_s0/model/versions/v0001.pt --scans p02,t00 --json docs/gate_vs_test.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "apps" / "hybrid_ct"))

import al_pools  # noqa: E402
from bench_active_learning import LABEL_INFO, SCALES, TestScorer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scans", default="p02,t00", help="source ids (pool) or ids (test) of the scans to score")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from hybrid_ct.net.checkpoint import load_checkpoint
    from lib.trainers.data import slices_of
    from lib.trainers.promotion import promotion_scores

    sc = SCALES["shipped"]
    pools = al_pools.build_pools(args.seed, sc["pool"], sc["test"], tuple(int(v) for v in sc["shape"].split(",")),
                                 real_max_slices=sc["real_max_slices"], pool_real=sc["pool_real"],
                                 test_real=sc["test_real"])
    by_name = {(c.info.get("source_id") or c.id): c for c in pools["pool"] + pools["test"]}
    cases = [by_name[n] for n in args.scans.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="gate_vs_test_"))
    files = {case.id: al_pools.write_case(case, tmp) for case in cases}  # once, whatever the number of models
    rows = []
    for model_path in args.models:
        model, _ = load_checkpoint(model_path, "cpu")
        for case in cases:
            ip, lp = files[case.id]
            data, _, _ = slices_of([{"id": case.id, "image": str(ip), "label": str(lp),
                                     "label_info": {"label_info": LABEL_INFO}}], model.cfg.in_size,
                                   model.cfg.input_spec())
            gate = promotion_scores(model.eval(), data, torch.device("cpu"), 8)
            test = TestScorer([case])(Path(model_path))
            row = {"model": model_path, "scan": case.info.get("source_id") or case.id, "kind": case.kind,
                   "gate_2d": {k: gate.get(k) for k in ("score", "lung_dice", "infection_dice")},
                   "product_3d": {k: test.get(k) for k in ("lung_dice", "infection_dice", "false_infection_ml")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python benchmarks/gate_vs_test.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
