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

VARIANTS = {"default": {}, "from_shipped": {"from_shipped": True}, "new_share_0": {"new_share": 0.0},
            "from_shipped_new_share_0": {"from_shipped": True, "new_share": 0.0}}


def sequence(cases: list, variant: dict, seed: int, replay: str | None, work: Path, scorer) -> list:
    """The server's rounds without HTTP: each case in turn added to the datastore as a final label, then one
    auto-retrain of the app's trainer (pending rule and judgement included) -> per round the served version's and
    the latest published version's test values."""
    from lib.datastore import HybridCTDatastore
    from lib.store import ModelStore
    from lib.trainers.hybrid_ct import HybridCTTrain

    if work.exists():
        shutil.rmtree(work)
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    store = ModelStore(work / "model")
    store.dir.mkdir(parents=True)
    src, _ = shipped_initial(work)
    os.symlink(src, store.shipped)
    task = HybridCTTrain(store, replay=replay)
    rounds = []
    for k, case in enumerate(cases, 1):
        ip, lp = al_pools.write_case(case, work / "hidden")
        shutil.copy(ip, studies / ip.name)
        shutil.copy(lp, studies / "labels" / "final" / ip.name)
        datalist = task.pre_process({}, HybridCTDatastore(str(studies), auto_reload=False))
        req = dict(task.config(), multi_gpu=False, device="cpu", model="hybrid_ct", seed=seed,
                   run_id=f"ab-{work.name}-{k}", **variant)
        t0 = time.time()
        stats = task.train(0, 1, req, datalist)
        published, served = stats["published_version"], store.current()
        row = {"round": k, "case": case.info.get("source_id") or case.id, "retrain_s": round(time.time() - t0, 1),
               "epochs": stats.get("epoch"), "published": published, "served": served,
               "decision": (stats.get("promotion") or {}).get("decision"),
               "judged": {k2: (stats.get("judged") or {}).get(k2) for k2 in ("candidate", "decision")},
               "test_served": {m: v for m, v in scorer(store.path(served)).items() if m != "per_scan"},
               "test_published": {m: v for m, v in scorer(store.path(published)).items() if m != "per_scan"}}
        rounds.append(row)
        print(f"[ab] {work.name} round {k} ({row['case']}): published {published} "
              f"{row['test_published']['dice']}, served {served} {row['test_served']['dice']}", flush=True)
    return rounds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--corrections", default="nsclc_lung1_001_lesions,nsclc_lung1_001,p03",
                    help="pool scans (source ids) corrected in this order, one retrain after each")
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
    by_source = {c.info.get("source_id") or c.id: c for c in pools["pool"]}
    cases = [by_source[name] for name in args.corrections.split(",")]
    for name, params in variants.items():
        rounds = sequence(cases, params, args.seed, args.replay, root / name, scorer)
        out["runs"].append({"variant": name, "params": params, "rounds": rounds})
        out["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
