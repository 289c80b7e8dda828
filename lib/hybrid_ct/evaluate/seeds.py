"""Run-to-run spread of one recipe: the headline numbers of every seed's evaluation, their mean and range,
and the MEDIAN build -- the one ``scripts/build_model.sh`` ships (never the best one).

    python -m hybrid_ct.evaluate.seeds --runs runs/build --out docs/seeds.md --print-median
    python -m hybrid_ct.evaluate.seeds --runs runs/build --out docs/seeds.md --ship docs/results.md --model-card docs/model_card.md

Each ``<runs>/seed<k>/results.json`` is written by ``hybrid-ct evaluate --json``. The median is taken on the
validation composite (mean of lung Dice on expert masks, MedSeg infection mean-slice Dice and the per-slice
AUC on real pictures): validation slices only, so no whole scan that is reported chooses the build.

The median build replaces the model shipped before only if it is not worse (``gate``): on the validation
composite's three numbers (within ``GATE_TOLERANCE``) and on the number of whole scans whose scan call is
right. Otherwise the previous model stays, ``--ship`` writes ITS evaluation (by today's code) with the
spread appended, and ``--print-median`` prints ``previous``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from hybrid_ct.evaluate.results_doc import metrics_card, update_model_card

HEADLINE = [  # label, path in a model's results, "validation" or "scan"
    ("lung Dice, expert masks (validation slices)", ("seg", "lung/real-expert", "dice")),
    ("infection Dice, MedSeg mean per slice", ("seg", "infection/medseg", "dice_per_case_mean")),
    ("per-slice AUC, real pictures", ("cls", "real", "auc")),
    ("per-slice sensitivity, real pictures", ("cls", "real", "sensitivity")),
    ("per-slice specificity, real pictures", ("cls", "real", "specificity")),
    ("energy ratio E_hybrid / E_conv", ("energy", "ratio")),
    ("mean firing rate", ("energy", "mean_firing_rate")),
    ("P001 P(positive)", ("scan", "P001", "probability")),
    ("P001 per-slice kappa (segmentation call)", ("scan", "P001", "agreement", "segmentation", "kappa")),
    ("normal001 P(positive)", ("scan", "normal001", "probability")),
    ("normal001 burden % of lung", ("scan", "normal001", "burden", "total_pct")),
    ("normal001 infection mL", ("scan", "normal001", "infection_ml")),
    ("cap001 per-slice sensitivity (segmentation)", ("scan", "cap001", "agreement", "segmentation", "sensitivity")),
    ("cap001 per-slice specificity (segmentation)", ("scan", "cap001", "agreement", "segmentation", "specificity")),
    ("LUNG1-001 lung Dice 3D", ("scan", "nsclc_lung1_001", "lung_dice")),
    ("LUNG1-001 false lung mL", ("scan", "nsclc_lung1_001", "false_lung_ml")),
    ("LUNG1-001 burden % of lung", ("scan", "nsclc_lung1_001", "burden", "total_pct")),
]
COMPOSITE = HEADLINE[:3]
GATE_TOLERANCE = 0.01  # the median may lose at most this much on a composite number and still ship


def get_path(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return float("nan")
        d = d[k]
    return float(d) if isinstance(d, (int, float)) and d is not None else float("nan")


def load_runs(runs) -> dict:
    """seed -> results dict (``hybrid`` / ``twin``) of every ``seed<k>/results.json`` under ``runs``."""
    out = {}
    for p in sorted(Path(runs).glob("seed*/results.json")):
        out[int(p.parent.name[4:])] = json.loads(p.read_text())
    if not out:
        raise SystemExit(f"no seed*/results.json under {runs}: run scripts/build_model.sh")
    return out


def composite(res: dict, tag: str = "hybrid") -> float:
    vals = [get_path(res.get(tag, {}), path) for _, path in COMPOSITE]
    return float(np.nanmean(vals)) if any(not math.isnan(v) for v in vals) else float("nan")


def median_seed(runs: dict) -> int:
    """The seed whose composite is the median (the lower middle for an even count)."""
    order = sorted(runs, key=lambda s: (composite(runs[s]), s))
    return order[(len(order) - 1) // 2]


def scan_calls_right(res: dict) -> int:
    """How many whole scans the hybrid network calls as their truth says (COVID-19 positive or negative)."""
    return sum(r.get("call") == r.get("truth") for r in (res.get("hybrid", {}).get("scan") or {}).values())


def gate(new: dict, previous: dict | None) -> tuple:
    """-> (ship the new build?, reasons it is worse). Worse: a composite number lower by more than
    ``GATE_TOLERANCE``, or fewer whole scans called right. No previous results: it ships."""
    if not previous or "hybrid" not in previous:
        return True, []
    worse = []
    for label, path in COMPOSITE:
        a, b = get_path(new["hybrid"], path), get_path(previous["hybrid"], path)
        if not math.isnan(b) and (math.isnan(a) or a < b - GATE_TOLERANCE):
            worse.append(f"{label} {fmt(a)} < {fmt(b)}")
    if scan_calls_right(new) < scan_calls_right(previous):
        worse.append(f"whole scans called right {scan_calls_right(new)} < {scan_calls_right(previous)}")
    return not worse, worse


def fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table(runs: dict, tag: str = "hybrid", previous: dict | None = None) -> str:
    """Every headline number per seed, the mean and the range; ``previous``: the results of the model shipped
    before, as a last column (its own recipe and split: compare against the range, not one seed)."""
    seeds = sorted(runs)
    med = median_seed(runs)
    prev = previous is not None and tag in previous
    mark = " (shipped)" if gate(runs[med], previous)[0] else " (median, not shipped)"
    head = ("| number | " + " | ".join(f"seed {s}{mark if s == med else ''}" for s in seeds) + " | mean | range |"
            + (" previous shipped model |" if prev else ""))
    lines = [head, "|---|" + "---|" * (len(seeds) + 2 + prev)]
    rows = [("validation composite (picks the median)", None)] + HEADLINE
    for label, path in rows:
        vals = [composite(runs[s], tag) if path is None else get_path(runs[s].get(tag, {}), path) for s in seeds]
        ok = [v for v in vals if not math.isnan(v)]
        mean = float(np.mean(ok)) if ok else float("nan")
        rng = f"{min(ok):.3f} – {max(ok):.3f} ({max(ok) - min(ok):.3f})" if ok else "n/a"
        old = (composite(previous, tag) if path is None else get_path(previous[tag], path)) if prev else None
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(mean)} | {rng} |"
                     + (f" {fmt(old)} |" if prev else ""))
    return "\n".join(lines)


def render(runs: dict, command: str, previous: dict | None = None) -> str:
    med = median_seed(runs)
    ok, worse = gate(runs[med], previous)
    decision = (f"the build with the median validation composite is shipped: **seed {med}**" if ok else
                f"the build with the median validation composite, **seed {med}, is NOT shipped**: it is worse than "
                f"the model shipped before ({'; '.join(worse)}), which stays (`seeds.gate`)")
    parts = [f"# Run-to-run spread of the shipped recipe ({len(runs)} seeds)", "",
             f"Command: `{command}` (called by `scripts/build_model.sh`). Each seed is a full build of the "
             f"`shipped` recipe (same data and split, its own initialisation and augmentation); {decision}. A "
             "difference between two models smaller than the range below is within run-to-run noise.", "",
             "## Hybrid (spiking) network", "", table(runs, "hybrid", previous)]
    if all("twin" in r for r in runs.values()):
        parts += ["", "## CNN twin", "", table(runs, "twin", previous)]
    return "\n".join(parts) + "\n"


def ship(runs_dir, seed, results_out, seeds_md, model_card=None) -> Path:
    """The shipped build's evaluation becomes ``results_out`` (its figures copied beside it, so the relative
    links hold) with the spread table appended; its numbers fill the model card's metrics section. The
    evaluation is not rerun: the shipped checkpoint is a byte copy of ``<runs>/seed<k>/hybrid.pt``, or
    with ``seed="previous"`` the model shipped before, evaluated in ``<runs>/previous``."""
    import shutil


    src = Path(runs_dir) / (f"seed{seed}" if seed != "previous" else "previous")
    out = Path(results_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if (src / "img").is_dir():
        shutil.copytree(src / "img", out.parent / "img", dirs_exist_ok=True)
    text = (src / "results.md").read_text(encoding="utf-8").rstrip()
    body = Path(seeds_md).read_text(encoding="utf-8").split("\n", 1)[1].replace("\n## ", "\n### ")
    who = (f"seed {seed}'s build" if seed != "previous" else "the model shipped before (the new build did not pass "
           "`seeds.gate`)")
    text += (f"\n\n## Run-to-run spread over seeds (`{seeds_md}`)\n\nThe shipped model is {who} "
             f"(`{src / 'hybrid.pt'}`, copied byte for byte); the numbers above are its evaluation.\n" + body.rstrip())
    out.write_text(text + "\n", encoding="utf-8")
    if model_card:
        res = json.loads((src / "results.json").read_text())
        update_model_card(model_card, "metrics", metrics_card(res, out, Path(model_card)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybrid_ct.evaluate.seeds", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="folder with seed<k>/results.json")
    ap.add_argument("--out", default=None, help="Markdown file for the spread table")
    ap.add_argument("--previous", default=None, help="results.json of the model shipped before (a column beside)")
    ap.add_argument("--print-median", action="store_true", help="print only the median seed (for scripts)")
    ap.add_argument("--ship", default=None, metavar="RESULTS_MD",
                    help="copy the median seed's results.md (+ figures) here with the spread appended")
    ap.add_argument("--model-card", default=None, help="with --ship: fill the card's metrics from the median seed")
    args = ap.parse_args(argv)
    runs = load_runs(args.runs)
    previous = json.loads(Path(args.previous).read_text()) if args.previous and Path(args.previous).is_file() else None
    if args.out:
        cmd = f"python -m hybrid_ct.evaluate.seeds --runs {args.runs} --out {args.out}" + (
            f" --previous {args.previous}" if previous else "")
        Path(args.out).write_text(render(runs, cmd, previous), encoding="utf-8")
    pick = median_seed(runs) if gate(runs[median_seed(runs)], previous)[0] else "previous"
    if args.ship:
        if not args.out:
            raise SystemExit("--ship needs --out (the spread table it appends)")
        ship(args.runs, pick, args.ship, args.out, args.model_card)
    print(pick if args.print_median else table(runs, "hybrid", previous))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
