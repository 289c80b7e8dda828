"""A simulated annotation campaign through the real Hybrid CT server: does each radiologist correction make
the served model better, and does the app's strategy pick better scans than random / MONAI Label's ``first``?

Per (strategy, seed): a fresh server started as the README does (``monailabel start_server --app apps/hybrid_ct``,
via ``tests/server_fixture.py``: 127.0.0.1, its own temp studies folder, model folder and sessions) whose studies
folder holds the UNLABELLED pool (``al_pools.py``: harder phantoms + real HU volumes with expert lungs; the
truth stays hidden in this process), and whose shipped model is a small network trained here on plain
phantoms (with its replay sample, as ``hybrid-ct train`` writes it). Then ``--rounds`` rounds of:

1. for ``uncertainty``-type strategies, ``POST /scoring/<method>`` and wait (what ``auto_scoring`` does after
   each model change; done explicitly so that the pick never uses stale scores);
2. ``POST /activelearning/<strategy>`` -> the next image (``--per-round`` times);
3. its truth submitted as the radiologist's correction: ``PUT /datastore/label?image=<id>&tag=final`` with
   the label file and ``params = {"label_info": [{"name": "lung", "idx": 1}, {"name": "infection", "idx": 2}]}``,
   exactly the request of ``hybrid_ct_slicer.client.HybridCTClient.save_label``;
4. the server's own auto-retrain (``--conf auto_train_after <per-round>``) and promotion gate run; we wait for
   the training task to end and read the decision from ``/info/`` ``train_stats``;
5. the served version (``GET /hybrid_ct/versions``) is scored on the fixed TEST pool, which never enters the
   datastore: its checkpoint file in the server's model folder is run through ``hybrid_ct.predict.Predictor``
   in this process (the class the server's infer task uses, same calibration rule), not uploaded to /infer.

Metrics per round: 3D lung Dice (every test scan), 3D infection Dice (positive test scans), false infection
mL (infection-free test scans: every voxel labelled infection), scan call accuracy (``classification.label``),
and the time from the correction submitted to the new model served or kept. Nothing calls the trainer.

    python benchmarks/bench_active_learning.py --initial shipped --replay runs/replay/pretrained.replay.npz \
        --workdir runs/al_final       # docs/active_learning.md: the README's network, 3 strategies x 3 seeds x 4 rounds
    python benchmarks/bench_active_learning.py --seeds 0,1,2 --rounds 4        # the tiny network (SCALES)
    python benchmarks/bench_active_learning.py --report results.json          # the doc again from a JSON
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import al_pools  # noqa: E402
import al_report  # noqa: E402
import server_fixture as sf  # noqa: E402

LABEL_INFO = [{"name": "lung", "idx": 1}, {"name": "infection", "idx": 2}]


def retrain_code() -> str:
    """sha256 of the retrain's and the gate's code (the app's trainers, the core's train package): part of a
    finished run's key, so that a reused --workdir never mixes runs of two retrain rules."""
    h = hashlib.sha256()
    for folder in (REPO / "apps" / "hybrid_ct" / "lib" / "trainers", REPO / "lib" / "hybrid_ct" / "train"):
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


SCORED = {"uncertainty": "uncertainty", "uncertainty_diverse": "uncertainty"}  # strategy -> the scoring method that must run before it picks
# --initial: what the server starts from, and the pools each scale's 2 cores can score. ``tiny``: the test
# architecture trained here (64x64, the earlier campaigns); ``shipped``: the package's checkpoint, as the README's
# server serves it (128x128, 5 levels, T=4), with a few whole real scans at full depth and chest-sized phantoms.
# The shipped model trained on imlab id002 (imlab id001 is its validation scan): its test pool holds id001.
SCALES = {
    "tiny": {"pool": 8, "test": 6, "shape": "16,64,64", "real_max_slices": 48,
             "pool_real": al_pools.POOL_REAL, "test_real": al_pools.TEST_REAL, "name": "active_learning_tiny"},
    "shipped": {"pool": 4, "test": 2, "shape": "48,256,256", "real_max_slices": 0,
                "pool_real": ("nsclc_lung1_001", "imlab_id002"), "test_real": ("imlab_id001",),
                "name": "active_learning"},
}


def train_initial_model(path: Path, seed: int, shape, epochs: int, n: int = 4) -> dict:
    """The 'shipped' model: the tiny test architecture trained on ``n`` plain phantoms, with its replay sample."""
    import torch

    from hybrid_ct.data.phantom import make_phantom
    from hybrid_ct.data.slice_store import SliceSet, replay_path, save_replay, slices_from_volume
    from hybrid_ct.net.checkpoint import save_checkpoint
    from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
    from hybrid_ct.train.config import TrainConfig
    from hybrid_ct.train.trainer import fit

    torch.manual_seed(seed)
    data = SliceSet.empty(sf.TINY_NET["in_size"])
    for i in range(n):
        img, lab, _ = make_phantom(9000 + 31 * seed + i, shape=shape, positive=i % 2 == 0)
        data = data.extend(slices_from_volume(img, lab, f"init{i}", size=sf.TINY_NET["in_size"]))
    model = HybridMultiTaskNet(NetConfig(**sf.TINY_NET))
    hist = fit(model, data, data, TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, negative_fraction=1.0,
                                              augment=False, seed=seed), progress=False)
    save_checkpoint(path, model, {"version": f"al-initial-s{seed}", "metric": hist[-1]["val"]["score"]})
    save_replay(data, replay_path(path), n=len(data), seed=seed)
    return {"epochs": epochs, "phantoms": n, "slices": len(data), "metric": round(float(hist[-1]["val"]["score"]), 4),
            "net": sf.TINY_NET}


def shipped_initial(root: Path) -> tuple:
    """The package's shipped checkpoint as the campaign's initial model -> (path, description). Its replay
    sample (``<model>.replay.npz``) goes along only where the package has one (a lab's server has no other)."""
    import torch

    from hybrid_ct.data.slice_store import replay_path
    from hybrid_ct.net.model_files import default_model_path

    src = default_model_path()
    payload = torch.load(src, map_location="cpu", weights_only=True)
    meta = payload.get("meta", {})
    rp = replay_path(src)
    info = {"kind": "shipped", "path": str(src), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
            "version": meta.get("version"), "net": payload["config"], "replay": str(rp) if rp.is_file() else None,
            "metric": meta.get("metric")}
    return src, info


def initial_model(kind: str, root: Path, seed: int, shape, args) -> tuple:
    """-> (checkpoint the server starts from, its description, the server's ``replay`` conf or None).
    ``tiny``: trained here once per seed and kept in ``root`` (a reused ``--workdir`` starts the same)."""
    from hybrid_ct.data.slice_store import replay_path

    if kind == "shipped":
        path, info = shipped_initial(root)
        if args.replay:  # built by ``hybrid-ct replay --out`` (what scripts/serve.sh puts beside the checkpoint)
            info["replay"] = str(Path(args.replay).resolve())
        return path, info, info["replay"]
    path = root / f"initial_s{seed}.pt"
    if path.is_file() and (root / f"initial_s{seed}.json").is_file():  # --workdir reused: the same start
        info = json.loads((root / f"initial_s{seed}.json").read_text())
    else:
        info = train_initial_model(path, seed, shape, args.init_epochs, args.init_phantoms)
        (root / f"initial_s{seed}.json").write_text(json.dumps(info))
    return path, info, str(replay_path(path))


class TestScorer:
    """Scores a checkpoint on the test pool (cached by file: a kept retrain leaves the served model as it was)."""

    def __init__(self, cases: list, cache_file: Path | None = None):
        self.cases, self.cache, self.cache_file = cases, {}, cache_file
        self.last_s = 0.0  # seconds the last call spent scoring (0: cached)
        if cache_file is not None and Path(cache_file).is_file():  # a rerun of the same --workdir: not again
            self.cache = json.loads(Path(cache_file).read_text())

    def __call__(self, path: Path) -> dict:
        import SimpleITK as sitk

        from hybrid_ct.predict.predictor import Predictor

        key = hashlib.sha256(path.read_bytes()).hexdigest()  # the same weights under another path: scored once
        self.last_s = 0.0
        if key in self.cache:
            return self.cache[key]
        t0 = time.time()
        print(f"[al] {_now()} scoring {path.name} on the test pool ({len(self.cases)} scans, "
              f"{sum(c.image.GetDepth() for c in self.cases)} slices)", flush=True)
        pred = Predictor.from_checkpoint(path, device="cpu", batch_size=8)
        per = []
        for c in self.cases:
            lab, rep = pred.predict(c.image)
            p, t = sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(c.label)
            vox_ml = float(np.prod(c.image.GetSpacing())) / 1000.0
            row = {"id": c.id, "kind": c.kind, "positive": c.positive, "lung_dice": _dice(p > 0, t > 0),
                   "call": rep["classification"]["label"], "call_ok": (rep["classification"]["label"] == "positive") == c.positive}
            if c.positive:
                row["infection_dice"] = _dice(p == 2, t == 2)
            else:
                row["false_infection_ml"] = round(float((p == 2).sum()) * vox_ml, 3)
                row["reported_infection_ml"] = float(rep["classification"].get("infection_ml", 0.0))
            per.append(row)
        out = {"lung_dice": _mean([r["lung_dice"] for r in per]),
               "infection_dice": _mean([r["infection_dice"] for r in per if "infection_dice" in r]),
               "false_infection_ml": _mean([r["false_infection_ml"] for r in per if "false_infection_ml" in r]),
               "scan_call_accuracy": _mean([float(r["call_ok"]) for r in per]),
               "real_lung_dice": _mean([r["lung_dice"] for r in per if r["kind"] == "real"]),
               "per_scan": per}
        out["dice"] = _mean([v for v in (out["lung_dice"], out["infection_dice"]) if v is not None])
        out["seconds"] = self.last_s = round(time.time() - t0, 1)
        self.cache[key] = out
        if self.cache_file is not None:
            Path(self.cache_file).write_text(json.dumps(self.cache))
        print(f"[al] {_now()}   -> dice {out['dice']} (lung {out['lung_dice']}, infection {out['infection_dice']}, "
              f"false infection {out['false_infection_ml']} mL) in {out['seconds']} s", flush=True)
        return out


def _now() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())


def _dice(a, b) -> float:
    s = int(a.sum()) + int(b.sum())
    return round(2.0 * int((a & b).sum()) / s, 5) if s else 1.0


def _mean(v):
    return round(float(np.mean(v)), 5) if len(v) else None


def _served(live) -> tuple:
    v = sf.http().get(f"{live.url}/hybrid_ct/versions", timeout=60).json()
    cur = v["current"]
    path = live.model_dir / "pretrained.pt" if cur == "shipped" else live.model_dir / "versions" / f"{cur}.pt"
    return cur, path


def _score_for(live, method: str, timeout_s: float) -> dict:
    s = sf.http()
    r = s.post(f"{live.url}/scoring/{method}", json={}, timeout=120)
    r.raise_for_status()
    task_id = r.json()["id"]

    def done():
        t = s.get(f"{live.url}/scoring/", timeout=60).json()
        return t if t.get("id") == task_id and t.get("status") in ("DONE", "ERROR") else None

    t = sf.wait_until(done, "the scoring task", timeout_s=timeout_s)
    return {"status": t["status"]}


def run_one(strategy: str, seed: int, pools: dict, args, workdir: Path, initial: Path, replay: str | None = None,
            on_round=None) -> dict:
    """One campaign: a fresh server, ``args.rounds`` rounds of ``args.per_round`` corrections. ``replay``: the
    server's ``replay`` conf (None: not set, the app's default). ``on_round(run)``: called after every round
    with the run so far (partial results kept)."""
    s = sf.http()
    truth = {c.id: c for c in pools["pool"]}
    hidden = workdir / "hidden"

    def studies_writer(studies: Path):
        studies.mkdir(parents=True, exist_ok=True)
        for c in pools["pool"]:
            ip, lp = al_pools.write_case(c, hidden)
            os.replace(ip, studies / ip.name)  # the image only: the label stays hidden

    train_params = dict(json.loads(args.auto_train_params or "{}"), seed=seed)
    conf = {"auto_train_after": str(args.per_round), "auto_train_params": json.dumps(train_params),
            "auto_scoring": "false"}
    if replay:
        conf["replay"] = replay
    t0 = time.time()
    print(f"[al] {_now()} {strategy} seed {seed}: starting the server from {initial.name} "
          f"({len(pools['pool'])} pool scans)", flush=True)
    live = sf.start_server(workdir, conf=conf, model=initial, studies_writer=studies_writer)
    rounds = []
    run = {"strategy": strategy, "seed": seed, "rounds": rounds, "complete": False}
    try:
        run["startup_s"] = round(time.time() - t0, 1)
        # the retrain defaults this server really had (lr, budget, replay, gate): the report quotes them
        info = s.get(f"{live.url}/info/", timeout=60).json()
        run["train_config"] = ((info.get("trainers") or {}).get("hybrid_ct") or {}).get("config")
        version, path = _served(live)
        rounds.append({"round": 0, "corrections": 0, "version": version, "test": args.scorer(path),
                       "test_s": args.scorer.last_s})
        picked = []
        for r in range(1, args.rounds + 1):
            row = {"round": r, "picks": []}
            if strategy in SCORED:
                t = time.time()
                print(f"[al] {_now()} round {r}: scoring the pool ({SCORED[strategy]})", flush=True)
                row["scoring"] = _score_for(live, SCORED[strategy], args.timeout)
                row["scoring_s"] = round(time.time() - t, 1)
            for _ in range(args.per_round):
                pick = s.post(f"{live.url}/activelearning/{strategy}", json={}, timeout=120).json()
                if not pick or not pick.get("id"):
                    break
                image_id = pick["id"]
                c = truth[image_id]
                lp = hidden / f"{image_id}_label.nii.gz"
                t_submit = time.time()
                resp = s.put(f"{live.url}/datastore/label", params={"image": image_id, "tag": "final"},
                             files={"params": (None, json.dumps({"label_info": LABEL_INFO})),
                                    "label": (lp.name, lp.read_bytes())}, timeout=300)
                resp.raise_for_status()
                picked.append(image_id)
                row["picks"].append({"id": image_id, "kind": c.kind, "positive": c.positive,
                                     "source": c.info.get("source_id"), "slices": int(c.image.GetDepth()),
                                     **{k: v for k, v in pick.items() if k in ("uncertainty", "weight")}})
                row["auto_train"] = resp.json().get("auto_train")
                print(f"[al] {_now()} round {r}: {strategy} picked {image_id} ({c.info.get('source_id')}, "
                      f"{c.image.GetDepth()} slices); correction submitted, auto-retrain "
                      f"{(row['auto_train'] or {}).get('started')}", flush=True)
            if not row["picks"]:
                break
            started = (row.get("auto_train") or {}).get("started")
            if started:
                time.sleep(1.0)
                sf.wait_training_idle(live, timeout_s=args.timeout)
            row["round_s"] = round(time.time() - t_submit, 1)  # last correction submitted -> model served or kept
            stats = s.get(f"{live.url}/info/", timeout=60).json()["train_stats"]["hybrid_ct"]
            prom = stats.get("promotion") or {}
            row["retrain"] = {k: stats.get(k) for k in ("status", "published_version", "current_version", "epoch",
                                                        "total_epochs", "best_metric", "time_budget", "train", "val",
                                                        "replay", "total_time", "error", "start_ts")} if started else None
            row["gate"] = {k: prom.get(k) for k in ("decision", "reason", "new", "served", "val_images",
                                                    "val_slices", "val_on_training_set", "val_replay_slices")} if started else None
            judged = stats.get("judged") if started else None
            if judged:  # the previous retrain, published pending, judged on this round's correction before training
                row["judged"] = {k: judged.get(k) for k in ("candidate", "decision", "reason", "new", "served",
                                                            "served_version", "judged_on", "val_slices")}
                if judged.get("ts"):
                    row["decision_s"] = round(float(judged["ts"]) - t_submit, 1)  # correction -> judged (served or kept)
            if started:  # where the round's time went: the retrain process starting, training, the gate + publishing
                row["epoch_s"] = [h.get("seconds") for h in stats.get("history") or []]
                row["breakdown"] = _breakdown(t_submit, row["round_s"], stats)
            version, path = _served(live)
            row.update(corrections=len(picked), version=version, test=args.scorer(path))
            row["test_s"] = args.scorer.last_s
            published = (row["retrain"] or {}).get("published_version")
            if published and published != version:  # a kept retrain: what serving it would have done
                row["test_published"] = {k: v for k, v in args.scorer(live.model_dir / "versions" / f"{published}.pt").items()
                                         if k != "per_scan"}
                row["test_s"] = round(row["test_s"] + args.scorer.last_s, 1)
            row["load_avg"] = [round(v, 2) for v in os.getloadavg()]
            rounds.append(row)
            print(f"[al] {_now()} {strategy} seed {seed} round {r}: picks {[p['id'] + '/' + p['kind'] for p in row['picks']]} "
                  f"-> {(row['gate'] or {}).get('decision')} served {version} dice {row['test']['dice']} "
                  f"({row['round_s']} s: {row.get('breakdown')}; test scoring {row['test_s']} s; load {row['load_avg']})",
                  flush=True)
            if on_round:
                on_round(run)
        run["complete"] = True
    finally:
        sf.stop_server(live)
    return run


def _breakdown(t_submit: float, round_s: float, stats: dict) -> dict:
    """round_s split: submit -> the retrain process started, training (epochs with their validation passes),
    the rest (the gate scoring new and served model, publishing, the process ending)."""
    start, train = stats.get("start_ts"), (stats.get("time_budget") or {}).get("train_s")
    if start is None or train is None:
        return {}
    to_start = round(max(float(start) - t_submit, 0.0), 1)
    return {"to_start_s": to_start, "train_s": train, "gate_publish_s": round(round_s - to_start - train, 1)}


def run_key(args, strategy: str, seed: int) -> str:
    """What a finished run depends on (a rerun of the same --workdir reuses a finished run with this key)."""
    keys = ("initial", "rounds", "per_round", "pool", "test", "shape", "no_real", "real_max_slices", "init_epochs",
            "init_phantoms", "auto_train_params", "replay", "retrain_code")
    return json.dumps({k: getattr(args, k) for k in keys} | {"strategy": strategy, "seed": seed}, sort_keys=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--initial", choices=sorted(SCALES), default="tiny",
                    help="what the server starts from: 'tiny' (the test architecture trained here, the default) or "
                         "'shipped' (the package's checkpoint, as the README's server; pools scaled to 2 cores)")
    ap.add_argument("--strategies", default="uncertainty,random,first")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (pools, initial model, retrain seed)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=1, help="corrections per round (= the server's auto_train_after)")
    ap.add_argument("--pool", type=int, default=None, help="phantoms in the unlabelled pool (+ real scans; "
                                                           "default: tiny 8, shipped 4)")
    ap.add_argument("--test", type=int, default=None, help="phantoms in the test pool (+ real scans; default: tiny 6, "
                                                           "shipped 2)")
    ap.add_argument("--shape", default=None, help="phantom shape z,y,x (default: tiny 16,64,64, shipped 48,256,256)")
    ap.add_argument("--no-real", action="store_true", help="phantoms only (no ../shared/data volumes)")
    ap.add_argument("--real-max-slices", type=int, default=None,
                    help="keep at most this many slices of a real scan (0: all; default: tiny 48, shipped 0)")
    ap.add_argument("--init-epochs", type=int, default=30)
    ap.add_argument("--init-phantoms", type=int, default=6)
    ap.add_argument("--auto-train-params", default="",
                    help='JSON train params of the auto-retrain ("" = the app defaults, max_minutes 5)')
    ap.add_argument("--replay", default=None, help="--initial shipped: the replay sample the server uses (default: "
                    "<package checkpoint>.replay.npz where it exists, as scripts/serve.sh builds it)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one retrain / scoring")
    ap.add_argument("--workdir", default=None, help="kept: a rerun reuses its finished runs and test scores")
    ap.add_argument("--json", default=None, help="default docs/<name>.json (name: active_learning with --initial "
                                                 "shipped, the product's campaign; active_learning_tiny)")
    ap.add_argument("--doc", default=None, help="default docs/<name>.md")
    ap.add_argument("--png", default=None, help="default docs/img/<name>.png")
    ap.add_argument("--notes", default=None, help="analysis included verbatim at the end of the doc (default: "
                                                  "benchmarks/al_notes.md with --initial shipped, al_notes_tiny.md)")
    ap.add_argument("--report", default=None, help="only rewrite the doc and plot from this JSON")
    ap.add_argument("--merge", default=None, help="add this run's strategies to an earlier JSON of the same settings")
    args = ap.parse_args(argv)
    args.retrain_code = retrain_code()
    scale = SCALES[args.initial]
    for k in ("pool", "test", "shape", "real_max_slices"):
        if getattr(args, k) is None:
            setattr(args, k, scale[k])
    name = scale["name"]
    args.json = args.json or str(REPO / "docs" / f"{name}.json")
    args.doc = str(REPO / "docs" / f"{name}.md") if args.doc is None else args.doc
    args.png = args.png or str(REPO / "docs" / "img" / f"{name}.png")
    args.notes = args.notes or str(REPO / "benchmarks" / ("al_notes_tiny.md" if args.initial == "tiny" else
                                                          "al_notes.md"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        al_report.write(json.loads(Path(args.report).read_text()), args.doc, args.png, notes=args.notes)
        return 0
    previous = json.loads(Path(args.merge).read_text()) if args.merge else None

    scale = SCALES[args.initial]
    shape = tuple(int(v) for v in args.shape.split(","))
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    strategies = [v.strip() for v in args.strategies.split(",") if v.strip()]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="hybrid_ct_al_")).resolve()  # the server runs in its own cwd
    root.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_active_learning.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = {"command": command, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                                           "load_avg_at_start": os.getloadavg()},
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "settings": {"initial": args.initial, "rounds": args.rounds, "per_round": args.per_round, "pool": args.pool,
                        "test": args.test, "shape": shape, "real": not args.no_real,
                        "real_max_slices": args.real_max_slices, "pool_real": list(scale["pool_real"]),
                        "test_real": list(scale["test_real"]), "auto_train_params": args.auto_train_params or "{}",
                        "strategies": strategies, "seeds": seeds, "retrain_code": args.retrain_code,
                        "replay": args.replay},
           "runs": [], "pools": {}}
    if previous:  # another strategy on the same pools and seeds: one table, one plot
        out["runs"] = previous["runs"]
        out["commands"] = previous.get("commands", [previous["command"]]) + [command]
        out["started"] = previous["started"]
        out["settings"]["strategies"] = list(dict.fromkeys(previous["settings"]["strategies"] + strategies))
        out["settings"]["seeds"] = list(dict.fromkeys(previous["settings"]["seeds"] + seeds))
        out["pools"] = dict(previous["pools"])

    def save(partial=None):
        out["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out["machine"]["load_avg_at_end"] = os.getloadavg()
        runs = out["runs"] + ([partial] if partial is not None else [])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(out, runs=runs), indent=1, default=str))  # partial results kept

    for seed in seeds:
        t = time.time()
        print(f"[al] {_now()} seed {seed}: building the pools ({args.initial})", flush=True)
        pools = al_pools.build_pools(seed, args.pool, args.test, shape, real=not args.no_real,
                                     real_max_slices=args.real_max_slices, pool_real=scale["pool_real"],
                                     test_real=scale["test_real"])
        print(f"[al] {_now()}   pools built in {time.time() - t:.0f} s: pool {al_pools.describe(pools['pool'])}, "
              f"test {al_pools.describe(pools['test'])}", flush=True)
        out["pools"][str(seed)] = {"pool": al_pools.describe(pools["pool"]), "test": al_pools.describe(pools["test"]),
                                   "notes": pools["notes"],
                                   "pool_ids": {c.id: [c.kind, c.positive, c.info.get("source_id")] for c in pools["pool"]}}
        initial, info, replay = initial_model(args.initial, root, seed, shape, args)
        out["pools"][str(seed)]["initial_model"] = info
        # one cache per seed (the initial model is scored once), kept in the workdir for a rerun
        args.scorer = TestScorer(pools["test"], root / f"test_scores_{args.initial}_s{seed}.json")
        for strategy in strategies:
            done = root / f"{strategy}_s{seed}.json"
            key = run_key(args, strategy, seed)
            if done.is_file() and json.loads(done.read_text()).get("key") == key:  # a rerun: this one finished
                print(f"[al] {_now()} {strategy} seed {seed}: reused from {done}", flush=True)
                out["runs"].append(json.loads(done.read_text())["run"])
                save()
                continue
            workdir = root / f"{strategy}_s{seed}"
            if workdir.exists():  # a run cut short: its server state is not resumable, start it again
                shutil.rmtree(workdir)
            run = run_one(strategy, seed, pools, args, workdir, Path(initial), replay, on_round=save)
            done.write_text(json.dumps({"key": key, "run": run}, default=str))
            out["runs"].append(run)
            save()
    if args.doc:
        al_report.write(out, args.doc, args.png, notes=args.notes)
    print(f"[al] wrote {args.json}" + (f", {args.doc}, {args.png}" if args.doc else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
