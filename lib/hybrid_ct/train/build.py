"""The twin -> conversion -> fine-tune build behind ``hybrid-ct train``: ``train_recipe`` trains the CNN
twin, converts it to the spiking network (``convert_twin``) and fine-tunes that (``train_one``), or trains
the hybrid network from scratch for a recipe without ``from_twin``. Checkpoints carry their provenance
(recipe, split, command, commit, timings) in their meta.
"""
from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
import os
import platform
import subprocess
import time
from pathlib import Path

from hybrid_ct.errors import InputError
from hybrid_ct.predict.predictor import energy_on_slices
from hybrid_ct.net.model_files import MAX_CHECKPOINT_MB
from hybrid_ct.train.recipes import recipe_slices
from hybrid_ct.files import jsonable
from hybrid_ct.data.slice_store import replay_path
from hybrid_ct.train.replay import write_replay
from hybrid_ct.data.manifest import data_root, group_family
from hybrid_ct.net.checkpoint import load_checkpoint, save_checkpoint
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig, cnn_twin, count_parameters, from_twin
from hybrid_ct.train.config import TrainConfig
from hybrid_ct.train.scoring import evaluate, recalibrate_batchnorm
from hybrid_ct.train.trainer import fit

log = logging.getLogger("hybrid_ct")


def _git_commit() -> str:
    """``git describe`` of the checkout holding this package ("unknown" for an installed package)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty",
                              "--abbrev=7"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"  # "<commit>-dirty": tracked files differed from the commit
    except Exception:  # noqa: BLE001 - provenance only
        return "unknown"


def _slim_history(history: list) -> list:
    out = []
    for h in history:
        h = copy.deepcopy(h)
        cls = h.get("val", {}).get("cls")
        if isinstance(cls, dict):
            cls.pop("roc", None)
        out.append(h)
    return jsonable(out)


def train_one(kind: str, cfg, train, val, tcfg, out: Path, meta: dict, progress: bool = True, model=None) -> dict:
    """Fit one network (hybrid or CNN twin; ``model`` to fine-tune an initialised one), saving the
    checkpoint after every epoch and at the end."""
    import torch


    torch.manual_seed(tcfg.seed)
    model = model if model is not None else HybridMultiTaskNet(cfg)
    t0 = time.perf_counter()
    iters = {"n": 0}
    base_meta = dict(meta, kind=kind, net=cfg.to_dict(), parameters=count_parameters(model))

    def on_epoch(epoch, stats, m):
        n = stats["train_slices"]
        n_it = n // tcfg.batch_size if n >= 2 * tcfg.batch_size else math.ceil(n / tcfg.batch_size)
        if tcfg.max_iters_per_epoch:
            n_it = min(n_it, tcfg.max_iters_per_epoch)
        iters["n"] += n_it
        stats["iterations"] = n_it
        stats["s_per_iter"] = stats["seconds"] / max(n_it, 1)
        log.info("%s epoch %d/%d: %.1f s, %.2f s/iteration", kind, epoch, tcfg.epochs, stats["seconds"], stats["s_per_iter"])
        save_checkpoint(out, m, jsonable(dict(base_meta, complete=False, epoch=epoch)))

    history = fit(model, train, val, tcfg, on_epoch=on_epoch, progress=progress)
    seconds = time.perf_counter() - t0
    train_s = sum(h["seconds"] for h in history)
    final = dict(base_meta, complete=True, history=_slim_history(history), train_seconds=seconds,
                 iterations=iters["n"], s_per_iter=train_s / max(iters["n"], 1),
                 finished=_dt.datetime.now().isoformat(timespec="seconds"))
    save_checkpoint(out, model, jsonable(final))
    mb = out.stat().st_size / 2**20
    log.info("%s: %s (%.2f MB, %d parameters, %.0f s, %.2f s/iteration)", kind, out, mb, final["parameters"],
             seconds, final["s_per_iter"])
    if mb > MAX_CHECKPOINT_MB:
        log.warning("%s checkpoint is %.1f MB, above the %.0f MB limit for the shipped model", kind, mb, MAX_CHECKPOINT_MB)
    return final


def convert_twin(twin_path: Path, cfg, conv: dict, train, val, tcfg):
    """The spiking network from the trained twin (``model.from_twin``): for each BatchNorm scale in
    ``conv["bn_scales"]``, convert, re-estimate the BatchNorm statistics on ``conv["calib_slices"]``
    training slices, score it on the validation curve slices and measure its energy ratio there. Keep
    the best score; with ``conv["energy_target"]`` (e.g. ``recipes.ENERGY_RATIO_TARGET``) the best score among
    the scales within it (none within: the lowest ratio). -> (model, record)."""
    import torch


    t0 = time.perf_counter()
    twin, _ = load_checkpoint(twin_path, tcfg.device)
    candidates = []  # (validation score, BatchNorm scale, energy ratio, model)
    for k in conv["bn_scales"]:
        model = from_twin(twin, cfg, float(k))
        recalibrate_batchnorm(model, train, conv["calib_slices"], tcfg.batch_size, tcfg.device, tcfg.seed)
        with torch.no_grad():
            score = evaluate(model, val, tcfg.batch_size, tcfg.device)["score"]
        ratio = energy_on_slices(model, val).ratio
        log.info("conversion: BatchNorm scale %s -> validation score %.3f, energy ratio %.3f (before fine-tuning)",
                 k, score, ratio)
        candidates.append((score, k, ratio, model))
    target = conv.get("energy_target")
    within = [c for c in candidates if target is None or c[2] <= target]
    best = max(within, key=lambda c: c[0]) if within else min(candidates, key=lambda c: c[2])  # first of equals
    record = {"from": str(twin_path), "bn_scale": best[1],
              "val_score_by_bn_scale": {str(k): score for score, k, _, _ in candidates},
              "energy_ratio_by_bn_scale": {str(k): ratio for _, k, ratio, _ in candidates},
              "energy_target": target,
              "calib_slices": conv["calib_slices"], "seconds": time.perf_counter() - t0}
    return best[3], record


def _trained_twin(path, recipe: dict, val_groups: list, twin_out: Path) -> dict:
    """The meta of a complete CNN twin of this recipe's network trained on this split (``--twin-from``),
    copied to ``twin_out``; anything else is refused (a twin of another net or split would be a different build)."""
    import shutil


    _, m = load_checkpoint(path)
    if not m.get("complete") or m.get("kind") != "cnn_twin":
        raise InputError(f"--twin-from {path}: not a complete CNN twin checkpoint")
    if (m.get("recipe") or {}).get("net") != recipe["net"] or sorted(m.get("val_groups") or []) != sorted(val_groups):
        raise InputError(f"--twin-from {path}: trained for another network or split than recipe {recipe['name']!r}")
    if Path(path).resolve() != Path(twin_out).resolve():
        shutil.copyfile(path, twin_out)
    return m


def train_recipe(recipe: dict, data, out, twin_out=None, device: str = "cpu", no_twin: bool = False,
                 progress: bool = True, command: str = "hybrid-ct train", twin_only: bool = False,
                 twin_from=None) -> tuple:
    """Train ``recipe`` (see ``recipes.resolve_recipe``) on the real data in ``data`` (None: $HYBRID_CT_DATA or
    ../shared/data, see ``datasets.data_root``): the hybrid checkpoint to
    ``out``, the CNN twin to ``twin_out`` (default ``<out stem>_twin.pt``). With ``recipe["train"]["from_twin"]``
    the twin is trained first and the hybrid converted from it, then fine-tuned; otherwise the hybrid is
    trained from scratch and then (unless ``no_twin``) the twin. ``twin_only``: the CNN twin alone, into
    ``out`` (quick experiments such as leave-one-source-out, ``scripts/loso.sh``). -> (results by
    "hybrid"/"twin", meta, seconds); ``command`` is recorded in the checkpoints."""
    from dataclasses import replace


    if twin_only and no_twin:
        raise InputError("--twin-only and --no-twin exclude each other")
    if recipe["train"].get("from_twin") and no_twin:
        raise InputError(f"recipe {recipe['name']!r} starts the hybrid network from its CNN twin: drop --no-twin")
    root = data_root(data)
    t0 = time.perf_counter()
    sets, val_groups, train_sets, val_sets, train, val, curve_val = recipe_slices(recipe, root, progress)
    if not len(train):
        raise InputError("no training slices: check --data and --sources")
    train_groups = set(train.group)
    assert not (train_groups & set(val.group)), "train / validation groups overlap"
    hold_out = recipe["data"].get("hold_out")
    if hold_out:
        assert not any(group_family(g) == hold_out for g in train_groups), f"held-out {hold_out} groups in training"
        log.info("held out of training: collection %s (all its slices are validation)", hold_out)
    data_s = time.perf_counter() - t0
    log.info("data: %d training slices (%d groups), %d validation slices (%d groups), %.0f s",
             len(train), len(train_groups), len(val), len(set(val.group)), data_s)
    tcfg = TrainConfig(**{k: v for k, v in recipe["train"].items() if k in TrainConfig.__dataclass_fields__},
                       device=device)
    cfg = NetConfig(**recipe["net"])
    meta = {
        "version": f"hybrid-ct-{recipe['name']}-{_dt.date.today().isoformat()}",
        "recipe": recipe, "data_root": str(root),
        "val_groups": val_groups,
        "sources": {s.name: s.summary() for s in sets},
        "split": {"train": {s.name: len(s) for s in train_sets}, "val": {s.name: len(s) for s in val_sets},
                  "train_slices": len(train), "val_slices": len(val), "train_groups": len(train_groups),
                  "val_groups": len(set(val.group)), "curve_val_slices": len(curve_val), "hold_out": hold_out},
        "command": command,
        "git_commit": _git_commit(), "device": tcfg.device, "host": f"{platform.machine()} {os.cpu_count()} cpu",
        "torch_threads": __import__("torch").get_num_threads(), "data_seconds": data_s,
    }
    results = {}
    out = Path(out)
    # the app's retraining replays a sample of this training data (trainers/hybrid_ct.py)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta["replay_slices"] = write_replay(train, cfg, replay_path(out), seed=tcfg.seed)
    twin_out = Path(twin_out) if twin_out else out.with_name(out.stem + "_twin.pt")
    conv = recipe["train"].get("from_twin")
    if twin_only:
        results["twin"] = train_one("cnn_twin", cnn_twin(cfg), train, curve_val, replace(tcfg), out, meta,
                                    progress=progress)
    elif conv:  # twin first, then the spiking network converted from it and fine-tuned
        if twin_from:  # a twin this recipe already trained (same net, same split): convert and fine-tune only
            results["twin"] = _trained_twin(twin_from, recipe, val_groups, twin_out)
        else:
            results["twin"] = train_one("cnn_twin", cnn_twin(cfg), train, curve_val, replace(tcfg), twin_out, meta,
                                        progress=progress)
        model, meta["conversion"] = convert_twin(twin_out, cfg, conv, train, curve_val, tcfg)
        ft = replace(tcfg, epochs=conv["epochs"], lr=conv["lr"],
                     spike_rate_weight=conv.get("spike_rate_weight", tcfg.spike_rate_weight))
        results["hybrid"] = train_one("hybrid", cfg, train, curve_val, ft, out, meta, progress=progress, model=model)
    else:
        results["hybrid"] = train_one("hybrid", cfg, train, curve_val, tcfg, out, meta, progress=progress)
        if not no_twin:
            results["twin"] = train_one("cnn_twin", cnn_twin(cfg), train, curve_val, replace(tcfg), twin_out, meta,
                                        progress=progress)
    return results, meta, time.perf_counter() - t0
