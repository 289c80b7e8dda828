"""Evaluation behind ``hybrid-ct evaluate``: per-source validation metrics and energy (``evaluate_sets``),
the COVID-CT-MD scan-level check (``scan_check``), both run for a model and its twin by
``evaluate_checkpoints``; ``run_on_slices`` / ``energy_on_slices`` run the product's slice path. The
picture checks (orientation, leave-one-source-out, pixel areas for ``diagnosis.slice_call``)
live in ``picture_eval``.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np

from hybrid_ct.predict.batch import display_slices
from hybrid_ct.processing.scan_call import SLICE_MIN_MM2
from hybrid_ct.errors import InputError
from hybrid_ct.train.recipes import load_recipe, load_recipe_data
from hybrid_ct.contract import LABELS, SEG_HEADS
from hybrid_ct.predict.predictor import run_on_slices
from hybrid_ct.data.slice_store import MISSING
from hybrid_ct.data.manifest import data_root, group_family, read_slice_labels, split_sets, val_groups_for
from hybrid_ct.evaluate.pictures import weak_mask_agreement
from hybrid_ct.data.wholescans import SCANS
from hybrid_ct.evaluate.pictures import medseg_pictures, orientation_check, picture_pixel_mm2
from hybrid_ct.evaluate.scan_check import REAL
from hybrid_ct.imaging.reader import read_image
from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.net.energy import EnergyMeter
from hybrid_ct.net.network import count_parameters
from hybrid_ct.predict.overlays import overlay_panels
from hybrid_ct.predict.predictor import Predictor
from hybrid_ct.processing.grid import make_context
from hybrid_ct.processing.postprocess import mask_label
from hybrid_ct.processing.scan_call import slice_call
from hybrid_ct.train.metrics import SegmentationMeter, classification_metrics, rates_at_threshold, sensitivity_at_specificity

log = logging.getLogger("hybrid_ct")

NORMAL_FP_FRACTION = 0.001  # a normal slice "has predicted infection" from 0.1 % of its pixels up
PICTURE_SOURCES = ("cls2d", "medseg")  # 2D pictures, one file per slice (1 mm pixels)
MIN_SPECIFICITY = 0.85  # the operating point reported beside the shipped one: best sensitivity at this specificity


def _true_label(s, i: int) -> np.ndarray:
    t = np.zeros(s.images.shape[1:], np.uint8)
    if s.lung[i, 0, 0] != MISSING:
        t[s.lung[i] == 1] = LABELS["lung"]
    if s.infection[i, 0, 0] != MISSING:
        t[s.infection[i] == 1] = LABELS["infection"]
    return t




def evaluate_sets(model, val_sets: list, batch_size: int = 16, progress: bool = True, pixel_mm2: dict | None = None,
                  min_lesion_mm2: float = SLICE_MIN_MM2, min_specificity: float = MIN_SPECIFICITY) -> dict:
    """Per-source segmentation and classification metrics + the energy of the whole validation run.

    Every classification entry also gets ``at_spec`` (the best sensitivity at specificity >=
    ``min_specificity`` on its own ROC) and ``at_real_threshold`` (sensitivity / specificity at the
    threshold that gives that specificity on all real slices pooled). With ``pixel_mm2`` (source name ->
    mm^2 of one model pixel per slice, ``picture_eval.picture_pixel_mm2``) those sources are also scored
    with ``diagnosis.slice_call`` (the call agreeing with the infection head, ``min_lesion_mm2``) into
    ``res["cls_agree"]``."""
    from tqdm import tqdm


    res = {"seg": {}, "cls": {}, "cls_agree": {}, "n": {}}
    scores = {"cls": {}, "cls_agree": {}}  # key -> (truth, score), for the operating points
    pooled_cls = {"real": ([], [], []), "all": ([], [], [])}
    pooled_agree = {"real": ([], [], [])}
    n_real_cls = 0
    seg_pools = {}
    t0 = time.perf_counter()
    n_slices = 0
    predictor = Predictor(model, batch_size=batch_size)  # inference copy (BatchNorm folded)
    with EnergyMeter(predictor.model) as meter:
        for s in tqdm([v for v in val_sets if len(v)], desc="evaluate", unit="source", disable=not progress, leave=False):
            sl = s.slices
            so = run_on_slices(predictor, sl, meter)
            n_slices += len(sl)
            res["n"][s.name] = {"slices": len(sl), "groups": len(set(sl.group))}
            pred = mask_label(so.lung[:, 0], so.infection[:, 0])
            normal = {i for i in range(len(sl)) if sl.lung[i, 0, 0] == MISSING and sl.infection[i, 0, 0] != MISSING
                      and not sl.infection[i].any()}  # slices of normal studies: derived empty infection mask
            if normal:
                frac = (pred[sorted(normal)] == 2).mean(axis=(1, 2))
                res.setdefault("normal", {})[s.name] = {
                    "slices": len(normal), "with_infection": int((frac >= NORMAL_FP_FRACTION).sum()),
                    "mean_infection_pct": float(100 * frac.mean())}
            for head, values in SEG_HEADS.items():  # Dice per segmentation head of contract.json
                classes, arr = {head: values}, getattr(sl, head)
                idx = [i for i in range(len(sl)) if arr[i, 0, 0] != MISSING and not (head == "infection" and i in normal)]
                if not idx:
                    continue
                key = f"{head}/{s.name}" + ("/weak" if head == "lung" and s.weak_lung else "")
                m = SegmentationMeter(classes)
                pools = [f"{head}/all-expert"] if not (head == "lung" and s.weak_lung) else []
                if s.name != "phantoms" and pools:
                    pools.append(f"{head}/real-expert")
                for p in pools:
                    seg_pools.setdefault(p, SegmentationMeter(classes))
                for i in idx:
                    t = _true_label(sl, i)
                    m.update(pred[i], t)
                    for p in pools:
                        seg_pools[p].update(pred[i], t)
                res["seg"][key] = dict(m.compute()[head], slices=len(idx))
            known = sl.cls >= 0
            if known.any():
                y, sc, yp = sl.cls[known].astype(int), so.positive_prob[known], so.predicted[known]
                areas = (pixel_mm2 or {}).get(s.name)
                calls = {"cls": (sc, yp)}
                if areas is not None:  # the slice call agreeing with the infection head
                    inf_mm2 = (pred == 2).reshape(len(sl), -1).sum(1) * np.asarray(areas)
                    a_call, a_score = slice_call(so.positive_prob, inf_mm2, min_lesion_mm2, cls_call=so.predicted)
                    calls["cls_agree"] = (a_score[known], a_call[known])
                colls = np.array([group_family(g) for g in np.asarray(sl.group)[known]])
                names = np.unique(colls)
                subsets = {s.name: np.ones(len(y), bool)}
                if len(names) > 1:  # per collection too (cls2d: UCSD, MosMed, Ma Jun)
                    subsets.update({f"{s.name}/{c}": colls == c for c in names})
                for kind, (score, call) in calls.items():
                    for key, k in subsets.items():
                        res[kind][key] = classification_metrics(y[k], score[k], y_pred=call[k])
                        scores[kind][key] = (y[k], score[k])
                pools = [(pooled_cls, p) for p in ("all",) + (("real",) if s.name != "phantoms" else ())]
                if s.name != "phantoms":
                    n_real_cls += len(y)
                    if "cls_agree" in calls:
                        pools.append((pooled_agree, "real"))
                for target, pool in pools:
                    score, call = calls["cls_agree" if target is pooled_agree else "cls"]
                    target[pool][0].extend(y.tolist())
                    target[pool][1].extend(score.tolist())
                    target[pool][2].extend(call.tolist())
    for name, m in seg_pools.items():
        res["seg"][name] = m.compute()[name.split("/")[0]]
    for kind, pooled in (("cls", pooled_cls), ("cls_agree", pooled_agree)):
        for pool, (y, sc, yp) in pooled.items():
            if y and (kind == "cls" or len(y) == n_real_cls):  # the agreeing call: only when it scored every real slice
                res[kind][pool] = classification_metrics(y, sc, y_pred=yp)
                scores[kind][pool] = (np.asarray(y), np.asarray(sc))
    _operating_points(res, scores, min_specificity)
    rep = meter.report()
    res["energy"] = {"ratio": rep.ratio, "mean_firing_rate": rep.mean_firing_rate,
                     "e_hybrid_uj": rep.e_hybrid_pj * 1e-6, "e_conv_uj": rep.e_conv_pj * 1e-6,
                     "firing_rates": rep.firing_rates, "time_steps": rep.time_steps}
    res["seconds_per_slice"] = (time.perf_counter() - t0) / max(n_slices, 1)
    return res


def _operating_points(res: dict, scores: dict, min_specificity: float) -> None:
    """``at_spec`` and ``at_real_threshold`` into every classification entry (see ``evaluate_sets``)."""

    for kind, by_key in scores.items():
        real = sensitivity_at_specificity(*by_key["real"], min_specificity) if "real" in by_key else None
        for key, (y, sc) in by_key.items():
            m = res[kind][key]
            m["at_spec"] = sensitivity_at_specificity(y, sc, min_specificity)
            if real is not None and not np.isnan(real["threshold"]):
                m["at_real_threshold"] = rates_at_threshold(y, sc, real["threshold"])


def scan_cases(root, meta: dict | None = None) -> dict:
    """The whole scans with scan-level truth (``scan_check.REAL``) present under ``root``: name -> {"path",
    "positive" (COVID-19), "infection", "slice_labels" (csv or None), "lung_ref" (or None), "trained_on"}
    -- ``trained_on`` from the checkpoint's recipe sources (the whole scans and imlab may be training data)."""

    sources = set(((meta or {}).get("recipe") or {}).get("data", {}).get("sources", []))
    labels = {"P001": "volumes_covid_ct_md/P001_slice_labels.csv", "cap001": SCANS["cap001"][2]}
    out = {}
    for name, (rel, covid, infection, ref) in REAL.items():
        path = Path(root) / rel
        if covid is None or not path.exists():
            continue
        csv_ = Path(root) / labels[name] if name in labels and (Path(root) / labels[name]).is_file() else None
        trained = ("wholescans" in sources and name in SCANS) or ("imlab" in sources and name.startswith("imlab"))
        out[name] = {"path": path, "positive": bool(covid), "infection": bool(infection), "slice_labels": csv_,
                     "lung_ref": Path(root) / ref if ref else None, "trained_on": trained}
    return out


def _agreement(call, truth: dict) -> dict:
    from sklearn.metrics import cohen_kappa_score

    zs = [z for z in range(len(call)) if z in truth]
    y, p = np.array([truth[z] for z in zs]), np.asarray(call)[zs]
    tp, tn = int(((p == 1) & (y == 1)).sum()), int(((p == 0) & (y == 0)).sum())
    fp, fn = int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
    both = len(np.unique(np.concatenate([p, y]))) > 1
    return {"n": len(zs), "truth_positive": int(y.sum()), "called_positive": int(p.sum()),
            "accuracy": (tp + tn) / max(len(zs), 1),
            "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "kappa": float(cohen_kappa_score(y, p)) if both and len(np.unique(y)) > 1 else float("nan")}


def scan_check(model, meta: dict, root, min_mm2: float = 50.0, progress: bool = True, img_dir: Path | None = None,
               tag: str = "hybrid") -> dict:
    """Every whole scan with scan-level truth (P001, normal001, cap001, LUNG1-001): scan call, burden, grade,
    per-slice infection calls vs the radiologist, 3D lung Dice and false lung volume on expert masks."""
    import SimpleITK as sitk


    out = {}
    predictor = Predictor(model, meta, progress=progress)
    for name, case in scan_cases(root, meta).items():
        img = read_image(case["path"])
        label, report = predictor.predict(img)
        lab = sitk.GetArrayFromImage(label)  # [z, y, x], z = SimpleITK slice index
        sp = label.GetSpacing()
        inf_mm2 = (lab == 2).reshape(len(lab), -1).sum(1) * sp[0] * sp[1]
        has_lung = (lab > 0).reshape(len(lab), -1).any(1)
        seg_call = (inf_mm2 >= min_mm2).astype(int)
        ctx = make_context(img, model.cfg.in_size)
        cls_call = None
        if ctx.perm[0] == 0:  # axial stack: canonical slice order is the index order, maybe reversed
            c = np.asarray(report["classification"]["slice_positive"], int)
            cls_call = (c[::-1] if 0 in ctx.flips else c) & has_lung
        truth = read_slice_labels(case["slice_labels"]) if case["slice_labels"] else {z: 0 for z in range(len(lab))} \
            if not case["infection"] else {}
        agree = {m: _agreement(call, truth) for m, call in (("segmentation", seg_call), ("classifier", cls_call))
                 if call is not None and truth}
        c = report["classification"]
        out[name] = {"truth": "positive" if case["positive"] else "negative", "infection": case["infection"],
                     "trained_on": case["trained_on"], "call": c["label"], "probability": c["probability"],
                     "infection_found": c.get("infection_found"), "infection_ml": c.get("infection_ml"),
                     "burden": report["burden"], "grade": report["grade"], "energy_ratio": report["energy"]["ratio"],
                     "slices": int(len(lab)), "agreement": agree, "latency_s": report["latency_s"]}
        vox_ml = float(np.prod(sp)) / 1000.0
        out[name]["lung_ml"] = float((lab > 0).sum() * vox_ml)
        if case["lung_ref"] is not None:
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(case["lung_ref"]))) > 0
            p = lab > 0
            out[name].update(lung_dice=float(2 * (p & ref).sum() / max(p.sum() + ref.sum(), 1)),
                             false_lung_ml=float((p & ~ref).sum() * vox_ml))
        if img_dir is not None:
            panels = []
            for s, lz, z in display_slices(img, label, 3):
                # display_slices works in LPS order: map back to the SimpleITK index for the title
                zi = z if ctx.perm[0] != 0 or 0 not in ctx.flips else len(lab) - 1 - z
                panels.append((s, lz, f"{name} z={zi} radiologist: {'inf' if truth.get(zi) else 'clear'}"))
            out[name]["overlay"] = str(overlay_panels(panels, Path(img_dir) / f"scan_{name}_{tag}.png"))
    return out


def _load(path):
    model, meta = load_checkpoint(path)
    return model, meta


def evaluate_checkpoints(model, twin=None, data=None, limit=None, skip_scan_check: bool = False,
                         min_lesion_mm2: float = 50.0, img_dir=None, progress: bool = True,
                         orientation: bool = True) -> tuple:
    """Validation metrics (+ the scan-level check, overlays into ``img_dir``) of checkpoint ``model`` and,
    when given, its CNN ``twin``, on the validation groups stored in the model (else its recipe's split).
    ``limit`` overrides the recipe's slices per source (0: all); ``min_lesion_mm2`` is the per-slice
    infection call (scan-level check, ``diagnosis.slice_call``); ``orientation``: the MedSeg validation
    pictures turned by 0/90/180/270 degrees (``picture_eval.orientation_check``). -> (results by
    "hybrid"/"twin", recipe, data root, weak-lung-mask agreement by expert set
    (``datasets.weak_mask_agreement``, {} without data))."""

    if img_dir is not None:
        Path(img_dir).mkdir(parents=True, exist_ok=True)
    models = {"hybrid": (model, *_load(model))}
    if twin:
        models["twin"] = (twin, *_load(twin))
    _, hmodel, hmeta = models["hybrid"]
    recipe = copy.deepcopy(hmeta.get("recipe") or load_recipe("shipped"))
    if limit is not None:
        recipe["data"]["limit"] = limit or None
    root = data_root(data or None)
    if not (root / "MANIFEST.csv").is_file() and hmeta.get("data_root"):
        root = Path(hmeta["data_root"])
    data_cache, results, pictures = {}, {}, None
    for tag, (path, net, meta) in models.items():
        size = net.cfg.in_size
        if size not in data_cache:
            data_cache[size] = load_recipe_data(recipe, root, size, progress=progress)
        sets = data_cache[size]
        vg = hmeta.get("val_groups") or sorted(val_groups_for(sets, recipe["data"]["val_fraction"], recipe["data"]["split_seed"]))
        _, val_sets = split_sets(sets, vg)
        log.info("evaluating %s on %d validation slices", tag, sum(len(v) for v in val_sets))
        areas = {v.name: picture_pixel_mm2(root, v, size) for v in val_sets if v.name in PICTURE_SOURCES}
        r = evaluate_sets(net, val_sets, progress=progress, pixel_mm2=areas, min_lesion_mm2=min_lesion_mm2)
        r["min_lesion_mm2"] = min_lesion_mm2
        if orientation and "medseg" in recipe["data"]["sources"]:
            if pictures is None:
                pictures = medseg_pictures(root, vg)
            log.info("orientation check of %s on %d MedSeg pictures x 4 angles", tag, len(pictures))
            r["orientation"] = orientation_check(Predictor(net, meta), pictures)
        r["path"] = str(path)
        r["meta"] = {k: meta.get(k) for k in ("version", "kind", "iterations", "s_per_iter", "train_seconds",
                                              "command", "git_commit", "finished", "split", "history", "device")}
        r["parameters"] = count_parameters(net)
        r["size_mb"] = Path(path).stat().st_size / 2**20
        r["net"] = net.cfg.to_dict()
        if not skip_scan_check:
            try:
                r["scan"] = scan_check(net, meta, root, min_lesion_mm2, progress=progress, img_dir=img_dir, tag=tag)
            except InputError as e:
                log.warning("scan-level check skipped: %s", e)
                r["scan"] = {}
        results[tag] = r
    try:
        weak = weak_mask_agreement(root)
    except InputError:
        weak = {}
    return results, recipe, root, weak
