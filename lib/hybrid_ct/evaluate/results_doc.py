"""``docs/results.md`` and the model card, rendered from the ``str.format`` templates in
``hybrid_ct/evaluate/templates/``.

Template rules (``_render``): a placeholder alone on its line whose value is empty (``""`` or None: an
optional block, an empty table) removes that line, and runs of blank lines left behind collapse into one.
Table rows and optional blocks are rendered here and passed in as text.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from pathlib import Path

from hybrid_ct.evaluate.validation import NORMAL_FP_FRACTION
from hybrid_ct.train.recipes import ENERGY_RATIO_TARGET
from hybrid_ct.evaluate.plots import firing_rates_plot, roc_plot, training_curves
from hybrid_ct.evaluate.scan_check import reliability_plot
from hybrid_ct.evaluate.validation import MIN_SPECIFICITY

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_DROP = "\x00drop\x00"

# Published numbers to compare with (SPEC.md; Inf-Net paper on the MedSeg slices).
REFERENCE = {
    "seed 002 (hybrid SNN, 20-case set + negatives, 256x256)": {
        "lung_dice": 0.915, "lung_iou": 0.844, "infection_dice": 0.532, "infection_iou": 0.366,
        "accuracy": 0.899, "sensitivity": 0.889, "specificity": 0.902, "auc": 0.99},
    "Inf-Net (MedSeg slices)": {"infection_dice": 0.682},
    "U-Net (MedSeg slices, reported by Inf-Net)": {"infection_dice": 0.439},
}
_REF_KEYS = ("lung_dice", "lung_iou", "infection_dice", "infection_iou", "accuracy", "sensitivity", "specificity", "auc")

CARD_MARK = "<!-- hybrid-ct:{name}:{end} -->"


def _render(name: str, **values) -> str:
    """Template ``name`` (``templates/<name>.md``) filled with ``values`` (see the module's rules)."""
    text = (TEMPLATE_DIR / f"{name}.md").read_text(encoding="utf-8").rstrip("\n")
    values = {k: _DROP if v is None or v == "" else v for k, v in values.items()}
    lines = [ln for ln in text.format(**values).split("\n") if ln != _DROP]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def _fmt(v, pct: bool = False, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f} %" if pct else f"{v:.{nd}f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _rel(path) -> str:
    """``path`` relative to the current folder when inside it, else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def conversion_pick(conv: dict) -> str:
    """One sentence: the BatchNorm scale the conversion kept, and why (older checkpoints lack the ratios)."""
    ratios = conv.get("energy_ratio_by_bn_scale") or {}
    by_k = "; ".join(f"{k}: score {v:.3f}" + (f", energy ratio {ratios[k]:.3f}" if k in ratios else "")
                     for k, v in conv["val_score_by_bn_scale"].items())
    target = conv.get("energy_target")
    rule = "best score" + (f" among the scales with energy ratio <= {target}" if target is not None else "")
    return f"BatchNorm scale {conv['bn_scale']} kept ({rule}), before fine-tuning by scale: {by_k}."


def smoke_note(results: dict, recipe: dict) -> str:
    """A warning when a model had fewer iterations than its recipe plans (smoke / interrupted runs)."""
    t = recipe.get("train", {})
    planned = (t.get("epochs") or 0) * (t.get("max_iters_per_epoch") or 0)
    done = {k: (r["meta"].get("iterations") or 0) for k, r in results.items()}
    if planned and any(v < 0.9 * planned for v in done.values()):
        got = ", ".join(f"{k} {v}" for k, v in done.items())
        return (f"Smoke run: the models had {got} training iterations of the {planned} that recipe "
                f"`{recipe.get('name', '?')}` plans; these numbers are not those of a fully trained model.")
    return ""


# ----------------------------------------------------------------------------------------------------
# results.md

def results_figures(results: dict, img_dir) -> dict:
    """ROC, training curves (when the checkpoints hold a history) and firing rates PNGs into ``img_dir``."""

    img_dir = Path(img_dir)
    figures = {"roc": roc_plot({t: dict(r["cls"].get("real", r["cls"].get("all", {})).get("roc", {}),
                                        auc=r["cls"].get("real", r["cls"].get("all", {})).get("auc", float("nan")))
                                for t, r in results.items()}, img_dir / "roc.png")}
    hist = {t: (r["meta"].get("history") or []) for t, r in results.items()}
    if any(hist.values()):
        figures["curves"] = training_curves(hist, img_dir / "training_curves.png")
    rates = results["hybrid"]["energy"]["firing_rates"]
    if rates:
        figures["rates"] = firing_rates_plot(rates, img_dir / "firing_rates.png")
    return figures


def _seg_row(label: str, key: str, results: dict) -> str:
    cells = [label]
    n = next((r["seg"][key].get("slices", "") for r in results.values() if key in r["seg"]), "")
    cells.append(str(n) if n != "" else "pooled")
    for r in results.values():
        m = r["seg"].get(key)
        if not m:
            cells += ["n/a"] * 5
            continue
        cells += [_fmt(m["dice"]), _fmt(m["iou"]), _fmt(m["sensitivity"]), _fmt(m["specificity"]),
                  _fmt(m.get("dice_per_case_mean"))]
    return _row(cells)


def _cls_row(label: str, key: str, results: dict) -> str:
    first = next((r["cls"][key] for r in results.values() if key in r["cls"]), None)
    if first is None:
        return ""
    cells = [label, f"{first['n']} ({first['positives']})"]
    for r in results.values():
        m = r["cls"].get(key)
        if not m:
            cells += ["n/a"] * 5
            continue
        cells += [_fmt(m["accuracy"]), _fmt(m["sensitivity"]), _fmt(m["specificity"]), _fmt(m["f1"]), _fmt(m["auc"])]
    return _row(cells)


def _seg_rows(results: dict) -> list:
    keys = sorted({k for r in results.values() for k in r["seg"]})
    names = {"lung/real-expert": "**lung, real expert masks (pooled)**",
             "infection/real-expert": "**infection, real expert masks (pooled)**",
             "lung/all-expert": "lung, all exact masks incl. phantoms", "infection/all-expert": "infection, all incl. phantoms"}
    order = [k for k in ("lung/real-expert", "infection/real-expert") if k in keys] + \
            [k for k in keys if k not in names] + [k for k in ("lung/all-expert", "infection/all-expert") if k in keys]
    return [_seg_row(names.get(k, k.replace("/weak", " (against WEAK lung masks)")), k, results) for k in order]


def _cls_rows(results: dict) -> list:
    h = results["hybrid"]
    main = ["real", "cls2d", "medseg", "phantoms", "all"]
    per_collection = sorted(k for k in h["cls"] if k.startswith("cls2d/"))
    keys = main[:2] + per_collection + main[2:] + [k for k in h["cls"] if k not in main + per_collection]
    return [row for row in (_cls_row(f"**{k}**" if k == "real" else k, k, results) for k in keys) if row]


SOURCE_LABELS = {"real": "**all real pictures**", "cls2d/ucsd": "UCSD COVID-CT", "cls2d/mosmed": "MosMed",
                 "cls2d/majun20": "Ma Jun 20 cases", "medseg": "MedSeg", "cls2d": "cls2d (UCSD + MosMed + Ma Jun)"}
COLLECTION_LABELS = {"ucsd": "UCSD COVID-CT", "mosmed": "MosMed", "majun20": "Ma Jun 20 cases"}
_CALLS = (("cls", "classifier"), ("cls_agree", "agreeing"))


def _pair(m: dict | None, a: str = "sensitivity", b: str = "specificity") -> str:
    return f"{_fmt(m.get(a))} / {_fmt(m.get(b))}" if m else "n/a"


def _sources_block(results: dict) -> str:
    """Per source: AUC, the shipped call, sensitivity at specificity >= MIN_SPECIFICITY, the pooled operating
    point; classifier only vs the call agreeing with the infection head (``diagnosis.slice_call``)."""

    rows, verdict = [], []
    for key, label in SOURCE_LABELS.items():
        for t, r in results.items():
            for kind, call in _CALLS:
                m = r.get(kind, {}).get(key)
                if not m:
                    continue
                rows.append(_row([label, f"{m['n']} ({m['positives']})", t, call, _fmt(m["auc"]), _fmt(m["sensitivity"]),
                                  _fmt(m["specificity"]), _fmt(m.get("at_spec", {}).get("sensitivity")),
                                  _pair(m.get("at_real_threshold"))]))
    if not rows:
        return ""
    for t, r in results.items():
        c, a = r.get("cls", {}).get("real"), r.get("cls_agree", {}).get("real")
        if c and a:
            ch = ", ".join(f"{name} {_fmt(c[k])} -> {_fmt(a[k])}" for k, name in
                           (("auc", "AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity")))
            verdict.append(f"- {t}, all real pictures, classifier only -> agreeing: {ch}.")
    mm2 = next((r.get("min_lesion_mm2") for r in results.values() if r.get("min_lesion_mm2") is not None), 50.0)
    return _render("results_sources", min_spec=MIN_SPECIFICITY, min_mm2=mm2, rows="\n".join(rows),
                   verdict="\n".join(verdict))


def _orientation_block(results: dict) -> str:
    rows, gaps, n = [], [], 0
    for t, r in results.items():
        o = r.get("orientation")
        if not o:
            continue
        n = o["pictures"]
        for angle, v in o["angles"].items():
            rows.append(_row([t, f"{angle} deg", f"{_fmt(v['infection_dice'])} ({v['infection_n']})",
                              f"{_fmt(v['lung_dice'])} ({v['lung_n']})", v["refused"], f"{v['called_positive']} / {n}"]))
        gaps.append(f"{t}: infection {_fmt(o['max_gap_infection_dice'])}, lung (weak) {_fmt(o['max_gap_lung_dice'])}")
    if not rows:
        return ""
    return _render("results_orientation", n=n, rows="\n".join(rows), gaps="; ".join(gaps))


def _loso_block(loso: list | None, results: dict) -> str:
    if not loso:
        return ""
    rows = []
    order = {c: i for i, c in enumerate(COLLECTION_LABELS)}
    for x in sorted(loso, key=lambda x: (order.get(x["collection"], 99), x["hold_out"] is None, x["path"])):
        m, c = x["metrics"], x["collection"]
        here = "; ".join(f"{t} {_fmt(r['cls'][f'cls2d/{c}']['auc'])} / {_pair(r['cls'][f'cls2d/{c}'])}"
                         for t, r in results.items() if f"cls2d/{c}" in r.get("cls", {}))
        rows.append(_row([f"**{COLLECTION_LABELS.get(x['hold_out'], x['hold_out'])}**" if x["hold_out"] else "none",
                          COLLECTION_LABELS.get(c, c), f"{m['n']} ({m['positives']})", f"`{_rel(x['path'])}`",
                          x.get("iterations"), _fmt(m["auc"]), _fmt(m["sensitivity"]), _fmt(m["specificity"]),
                          _fmt(m["at_spec"]["sensitivity"]), here or "n/a"]))
    return _render("results_loso", min_spec=MIN_SPECIFICITY, rows="\n".join(rows))


def _scan_block(results: dict, min_lesion_mm2: float, rel) -> str:
    if not any(r.get("scan") for r in results.values()):
        return "Not run (COVID-CT-MD series not found, or `--skip-scan-check`)."
    calls, agreement, overlays = [], [], []
    for t, r in results.items():
        for name, s in (r.get("scan") or {}).items():
            b = s["burden"]
            calls.append(_row([t, name, s["truth"], f"**{s['call']}**", f"{s['probability']:.3f}",
                               f"{b['total_pct']:.2f} / {b['left_pct']:.2f} / {b['right_pct']:.2f} %", s["grade"]]))
    for t, r in results.items():
        for name, s in (r.get("scan") or {}).items():
            for method, a in s["agreement"].items():
                agreement.append(_row([t, name, method, f"{a['n']} ({a['truth_positive']})", a["called_positive"],
                                       _fmt(a["accuracy"]), _fmt(a["sensitivity"]), _fmt(a["specificity"]),
                                       _fmt(a["kappa"])]))
    for t, r in results.items():
        for name, s in (r.get("scan") or {}).items():
            if s.get("overlay"):
                overlays.append(f"![{t} {name}]({rel(s['overlay'])})")
    return _render("results_scan", min_lesion_mm2=min_lesion_mm2, call_rows="\n".join(calls),
                   agreement_rows="\n".join(agreement), overlays="\n\n".join(overlays))


def render_results(results: dict, recipe: dict, figures: dict, weak: dict, out: Path, command: str,
                   min_lesion_mm2: float = 50.0, loso: list | None = None) -> str:
    """The text of results.md (``out`` locates the figures' relative links; ``command`` is quoted)."""
    tags = list(results)
    h = results["hybrid"]
    rel = lambda p: os.path.relpath(p, Path(out).parent)  # noqa: E731
    model_rows = []
    for t, r in results.items():
        m = r["meta"]
        model_rows.append(_row([t, f"`{_rel(r['path'])}`", m.get("version"), f"{r['parameters']:,}",
                                f"{r['size_mb']:.2f} MB",
                                f"{m.get('iterations')} iterations, {(m.get('train_seconds') or 0) / 60:.1f} min on "
                                f"{m.get('device')}", _fmt(m.get("s_per_iter"), nd=2), _fmt(r["seconds_per_slice"], nd=3)]))
    conv = h["meta"].get("conversion")
    normal = [_row([t, name, v["slices"], v["with_infection"], f"{v['mean_infection_pct']:.2f} %"])
              for t, r in results.items() for name, v in (r.get("normal") or {}).items()]
    this_rows = []
    for t, r in results.items():
        lung, inf, c = r["seg"].get("lung/real-expert", {}), r["seg"].get("infection/medseg", {}), r["cls"].get("real", {})
        this_rows.append(_row([f"**this {t}** (lung: real expert; infection: MedSeg mean slice Dice; class: real slices)",
                               _fmt(lung.get("dice")), _fmt(lung.get("iou")), _fmt(inf.get("dice_per_case_mean")),
                               _fmt(inf.get("iou")), _fmt(c.get("accuracy")), _fmt(c.get("sensitivity")),
                               _fmt(c.get("specificity")), _fmt(c.get("auc"))]))
    e, net, split = h["energy"], h["net"], h["meta"].get("split") or {}
    te = results.get("twin", {}).get("energy")
    short = smoke_note(results, recipe)
    text = _render(
        "results", command=command, now=_dt.datetime.now().isoformat(timespec="minutes"),
        smoke_note=f"> **{short}**" if short else "", model_rows="\n".join(model_rows),
        net=net, neuron=net["neuron"].upper(), recipe_name=recipe.get("name", "?"),
        conversion=_render("results_conversion", conv=conv, iterations=h["meta"].get("iterations"),
                           pick=conversion_pick(conv)) if conv else "",
        data=recipe["data"], oversample=recipe["data"].get("oversample", {}),
        train_slices=split.get("train_slices", "?"), train_groups=split.get("train_groups", "?"),
        val_slices=split.get("val_slices", "?"), val_groups=split.get("val_groups", "?"),
        source_rows="\n".join(_row([name, n["slices"], n["groups"]]) for name, n in h["n"].items()),
        seg_header=" | ".join(f"{t} Dice | {t} IoU | {t} sens. | {t} spec. | {t} mean slice Dice" for t in tags),
        seg_rule="|" + "---|" * (2 + 5 * len(tags)), seg_rows="\n".join(_seg_rows(results)),
        normal=_render("results_normal", threshold_pct=100 * NORMAL_FP_FRACTION, rows="\n".join(normal)) if normal else "",
        cls_header=" | ".join(f"{t} acc. | {t} sens. | {t} spec. | {t} F1 | {t} AUC" for t in tags),
        cls_rule="|" + "---|" * (2 + 5 * len(tags)), cls_rows="\n".join(_cls_rows(results)),
        roc=f"![ROC]({rel(figures['roc'])})" if "roc" in figures else "",
        sources=_sources_block(results), loso=_loso_block(loso, results), orientation=_orientation_block(results),
        energy=e, firing_pct=100 * e["mean_firing_rate"],
        cross_check=(f"Cross-check: the trained CNN twin costs {te['e_hybrid_uj']:.2f} uJ per slice "
                     f"(its own ratio {te['ratio']:.2f}, by definition 1).") if te else "",
        rate_rows="\n".join(f"| `{name}` | {100 * v:.2f} % |" for name, v in e["firing_rates"].items()),
        rates_figure=f"![firing rates]({rel(figures['rates'])})" if "rates" in figures else "",
        scan=_scan_block(results, min_lesion_mm2, rel),
        reference_rows="\n".join([_row([name] + [_fmt(ref.get(k)) for k in _REF_KEYS]) for name, ref in REFERENCE.items()]
                                 + this_rows),
        curves=_render("results_curves", figure=rel(figures["curves"])) if "curves" in figures else "",
        weak=_render("results_weak", rows="\n".join(
            _row([k, v["n"], _fmt(v["dice_mean"]), _fmt(v["dice_median"])]) for k, v in weak.items())) if weak else "")
    return text + "\n"


def write_results(results: dict, recipe: dict, weak: dict, out, img_dir, command: str,
                  min_lesion_mm2: float = 50.0, loso: list | None = None) -> Path:
    """Figures into ``img_dir`` and results.md to ``out`` (``loso``: ``picture_eval.loso_results`` rows); -> ``out``."""
    out = Path(out)
    figures = results_figures(results, img_dir)
    text = render_results(results, recipe, figures, weak, out, command, min_lesion_mm2, loso)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------------
# model card

def update_model_card(path, section: str, text: str) -> None:
    """Replace the text between ``<!-- hybrid-ct:<section>:start/end -->`` (appended when missing)."""
    path = Path(path)
    start, end = CARD_MARK.format(name=section, end="start"), CARD_MARK.format(name=section, end="end")
    body = path.read_text(encoding="utf-8") if path.is_file() else "# Model card\n"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in body and end in body:
        a, b = body.index(start), body.index(end) + len(end)
        body = body[:a] + block + body[b:]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")


def training_card(results: dict, meta: dict, total_s: float, out: Path) -> str:
    """The model card's "training" section for a ``pipeline.train_recipe`` run (``out``: the hybrid checkpoint)."""
    h, r = results["hybrid"], meta["recipe"]
    t = results.get("twin")
    twin = (f"- CNN twin: {t['parameters']:,} parameters, {t['iterations']} iterations, {t['s_per_iter']:.2f} "
            f"s/iteration, {t['train_seconds'] / 60:.1f} min") if t else ""
    c = meta.get("conversion")
    conversion = (f"- Hybrid initialised from the trained twin (ANN-to-SNN conversion, then the surrogate-gradient "
                  f"fine-tuning above; BatchNorm statistics re-estimated on {c['calib_slices']} training slices, "
                  f"{c['seconds']:.0f} s). {conversion_pick(c)}") if c else ""
    return _render("card_training", meta=meta, h=h, r=r, d=r["data"], split=meta["split"],
                   net_json=json.dumps(r["net"]), train_json=json.dumps(dict(r["train"])),
                   oversample=r["data"].get("oversample"), max_per_group=r["data"].get("max_per_group"),
                   size_mb=Path(out).stat().st_size / 2**20, train_min=h["train_seconds"] / 60, twin=twin,
                   conversion=conversion, total_min=total_s / 60)


def _get(r, *ks):
    v = r
    for k in ks:
        v = v.get(k, {}) if isinstance(v, dict) else {}
    return v if isinstance(v, (int, float)) else None


def metrics_card(results: dict, out: Path, card: Path, note: str = "") -> str:
    """The model card's "metrics" section for an evaluation (``out``: its results.md, linked from ``card``)."""
    tw, h = results.get("twin", {}), results["hybrid"]
    rows = [("lung Dice (real expert masks)", ("seg", "lung/real-expert", "dice"), 0.915),
            ("infection Dice (MedSeg, pooled)", ("seg", "infection/medseg", "dice"), 0.532),
            ("infection Dice (MedSeg, mean per slice)", ("seg", "infection/medseg", "dice_per_case_mean"), None),
            ("classification accuracy (real slices)", ("cls", "real", "accuracy"), 0.899),
            ("sensitivity", ("cls", "real", "sensitivity"), 0.889),
            ("specificity", ("cls", "real", "specificity"), 0.902),
            ("AUC", ("cls", "real", "auc"), 0.99),
            ("energy E_hybrid / E_conv", ("energy", "ratio"), ENERGY_RATIO_TARGET)]
    lines = [_row([label, _fmt(_get(h, *ks)), _fmt(_get(tw, *ks)) if tw else "n/a", _fmt(ref)]) for label, ks, ref in rows]
    for name, v in (h.get("normal") or {}).items():
        t = (tw.get("normal") or {}).get(name)
        lines.append(f"| normal slices ({name}, CT-0) with predicted infection | {v['with_infection']} / {v['slices']} | "
                     + (f"{t['with_infection']} / {t['slices']}" if t else "n/a") + " | |")
    for name, s in (h.get("scan") or {}).items():
        a = s["agreement"].get("segmentation", {})
        twin_call = tw["scan"][name]["call"] if tw and tw.get("scan", {}).get(name) else "n/a"
        truth = "COVID-19" if s["truth"] == "positive" else "not COVID-19" + (", infection" if s.get("infection") else "")
        trained = ", **trained on**" if s.get("trained_on") else ""
        lung = f", lung Dice {s['lung_dice']:.3f}, false lung {s['false_lung_ml']:.0f} mL" if "lung_dice" in s else ""
        lines.append(f"| whole scan {name} ({truth}{trained}) | {s['call']}, p {s['probability']:.2f}, {s['grade']}, "
                     f"burden {s['burden']['total_pct']:.1f} %{lung} | {twin_call} | |")
        if a and s["truth"] == "positive":
            lines.append(f"| {name} per-slice agreement (segmentation call) | acc {_fmt(a['accuracy'])}, kappa "
                         f"{_fmt(a['kappa'])} | | |")
    return _render("card_metrics", now=_dt.datetime.now().isoformat(timespec="minutes"), out_name=Path(out).name,
                   link=os.path.relpath(Path(out).resolve(), Path(card).resolve().parent),
                   note=f"> **{note}**" if note else "", rows="\n".join(lines))


# ----------------------------------------------------------------------------------------------------
# whole scans: targets table, reliability plot, spread over seeds

def scan_extras(results: dict, out: Path, img_dir) -> str:
    """The whole-scan targets per model (3D lung Dice and false lung on expert masks, burden,
    grade, whether the scan was a training scan) and the reliability plot of the scan probabilities (the
    spread over seeds is appended by ``python -m hybrid_ct.evaluate.seeds --ship``)."""

    rows = []
    for t, r in results.items():
        for name, s in (r.get("scan") or {}).items():
            rows.append(_row([t, name, "COVID-19" if s["truth"] == "positive" else "not COVID-19",
                              "yes" if s.get("infection") else "no", "**yes**" if s.get("trained_on") else "no",
                              f"{s['call']} ({s['probability']:.3f})", s["grade"],
                              f"{s['burden']['total_pct']:.2f} %", _fmt(s.get("infection_ml"), nd=1),
                              _fmt(s.get("lung_dice")), _fmt(s.get("false_lung_ml"), nd=0)]))
    parts = []
    if rows:
        parts += ["## Whole scans against the diagnosis targets", "",
                  "Targets: every infection-free scan negative, burden < 0.1 % of lung, grade CT-0, < 5 mL false lung; "
                  "P001 positive with per-slice kappa >= 0.75 (table above); lung Dice >= 0.97 in 3D on expert masks. "
                  "*Trained on* = the scan was training data of this model (source `wholescans`): its numbers are "
                  "not validation. P001 and normal001 are never trained on.", "",
                  "| model | scan | truth | infection | trained on | call (P) | grade | burden | infection mL | "
                  "lung Dice 3D | false lung mL |", "|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    h = [{"covid": int(s["truth"] == "positive"), "probability": s["probability"], "name": n, "phantom": False}
         for n, s in (results["hybrid"].get("scan") or {}).items()]
    if len(h) >= 2:
        png = Path(img_dir) / "reliability_scans.png"
        reliability_plot(h, png)
        parts += ["", f"Reliability of the scan probability (hybrid, {len(h)} whole scans; with so few scans it shows "
                  "where each scan lands, not a calibration curve):", "",
                  f"![reliability]({os.path.relpath(png, Path(out).parent)})"]
    return "\n".join(parts)
