"""A/B of the app's retrain settings on a DEVELOPMENT pool, before a campaign measures them.

Every retrain of the shipped network in the active-learning campaigns lowered the test Dice (docs/
active_learning_shipped*.md). This finds out which retrain setting is responsible without looking at a
campaign's reported pools: the pools of ``--seed`` (default 9; the campaigns report seeds 0-2) are built by
``al_pools.build_pools`` at the shipped scale. Per correction kind (``--corrections``: the first pool scan of
that kind) and per variant (``--variants``: train params over the app's defaults), the app's own trainer
(``HybridCTTrain.train``, in this process, as tests/test_app_units.py runs it; a temp model folder whose shipped
model is the package checkpoint, the ``--replay`` sample beside it) fine-tunes the shipped model on that one
corrected scan, exactly as the server's auto-retrain would (``val_split`` 0: published pending). The shipped
model and each retrain are scored on the seed's test pool with the campaign's ``TestScorer``.

    python benchmarks/retrain_ab.py --replay runs/replay/pretrained.replay.npz --json docs/retrain_ab.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "apps" / "hybrid_ct"))

import al_pools  # noqa: E402
from bench_active_learning import SCALES, TestScorer, shipped_initial  # noqa: E402

VARIANTS = {"default": {}, "freeze_bn": {"freeze_bn": True}}


def retrain(case, variant: dict, seed: int, replay: str | None, work: Path) -> tuple:
    """One auto-retrain of the shipped model on ``case`` -> (published checkpoint, train_stats)."""
    from lib.datastore import HybridCTDatastore
    from lib.store import ModelStore
    from lib.trainers.hybrid_ct import HybridCTTrain

    if work.exists():
        shutil.rmtree(work)
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    ip, lp = al_pools.write_case(case, work / "hidden")
    shutil.copy(ip, studies / ip.name)
    shutil.copy(lp, studies / "labels" / "final" / ip.name)
    store = ModelStore(work / "model")
    store.dir.mkdir(parents=True)
    src, _ = shipped_initial(work)
    os.symlink(src, store.shipped)
    task = HybridCTTrain(store, replay=replay)
    datalist = task.pre_process({}, HybridCTDatastore(str(studies), auto_reload=False))
    req = dict(task.config(), multi_gpu=False, device="cpu", model="hybrid_ct", seed=seed, val_split=0.0,
               run_id=f"ab-{work.name}", **variant)
    stats = task.train(0, 1, req, datalist)
    return store.path(stats["published_version"]), stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--corrections", default="lesions,real", help="kinds of pool scan, one retrain each")
    ap.add_argument("--variants", default=json.dumps(VARIANTS), help="JSON {name: train params}")
    ap.add_argument("--replay", default=None)
    ap.add_argument("--workdir", default=str(REPO / "runs" / "retrain_ab"))
    ap.add_argument("--json", default=str(REPO / "docs" / "retrain_ab.json"))
    args = ap.parse_args(argv)
    variants = json.loads(args.variants)
    sc = SCALES["shipped"]
    shape = tuple(int(v) for v in sc["shape"].split(","))
    pools = al_pools.build_pools(args.seed, sc["pool"], sc["test"], shape, real_max_slices=sc["real_max_slices"],
                                 pool_real=sc["pool_real"], test_real=sc["test_real"])
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    scorer = TestScorer(pools["test"], root / f"test_scores_s{args.seed}.json")
    src, info = shipped_initial(root)
    out = {"command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:])),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seed": args.seed,
           "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
           "pool": al_pools.describe(pools["pool"]), "test": al_pools.describe(pools["test"]),
           "shipped": {k: v for k, v in scorer(src).items() if k != "per_scan"}, "runs": []}
    for kind in args.corrections.split(","):
        case = next(c for c in pools["pool"] if c.kind == kind)
        for name, params in variants.items():
            t0 = time.time()
            path, stats = retrain(case, params, args.seed, args.replay, root / f"{kind}_{name}")
            test = scorer(path)
            out["runs"].append({"correction": kind, "case": case.info.get("source_id") or case.id, "variant": name,
                                "params": params, "retrain_s": round(time.time() - t0, 1), "epochs": stats.get("epoch"),
                                "test": {k: v for k, v in test.items() if k != "per_scan"},
                                "per_scan": test["per_scan"]})
            print(f"[ab] {kind} {name}: dice {test['dice']} (lung {test['lung_dice']}, infection "
                  f"{test['infection_dice']}, false infection {test['false_infection_ml']} mL); shipped "
                  f"{out['shipped']['dice']}", flush=True)
            out["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
