"""Side by side: the headline numbers of several evaluated builds, one column each (the 2.5D input against
the single slice, grid sizes), and a plot of the numbers against a numeric setting.

    python -m hybrid_ct.evaluate.compare --out docs/context.md --title "..." "single slice=runs/study/a/results.json" \
        "2.5D=runs/study/b/results.json"

Each ``results.json`` is written by ``hybrid-ct evaluate --json``; the numbers are those of
``hybrid_ct.evaluate.seeds.HEADLINE`` (validation slices first, then the whole scans, which never choose a build).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hybrid_ct.evaluate.seeds import HEADLINE, composite, fmt, get_path

COST = [  # label, path in a model's results, scale: what each build cost (from its checkpoint's meta)
    ("training iterations", ("meta", "iterations"), 1),
    ("training minutes (this machine, as built)", ("meta", "train_seconds"), 1 / 60),
    ("inference seconds per slice (evaluation)", ("seconds_per_slice",), 1),
]
PLOTTED = ("lung Dice, expert masks (validation slices)", "infection Dice, MedSeg mean per slice",
           "per-slice AUC, real pictures", "LUNG1-001 lung Dice 3D")


def _num(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table(named: list, tag: str = "hybrid") -> str:
    """``named``: [(column name, results dict)] -> a Markdown table of every headline number (of the model
    evaluated as ``tag``: ``hybrid`` is the ``--model`` of ``hybrid-ct evaluate``, ``twin`` its ``--twin``)."""
    lines = ["| number | " + " | ".join(n for n, _ in named) + " |", "|---|" + "---|" * len(named)]
    lines.append("| validation composite | " + " | ".join(fmt(composite(r, tag)) for _, r in named) + " |")
    for label, path in HEADLINE:
        vals = [get_path(r.get(tag, {}), path) for _, r in named]
        if all(math.isnan(v) for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + " |")
    for label, path, scale in COST:
        vals = [get_path(r.get(tag, {}), path) * scale for _, r in named]
        if not all(math.isnan(v) for v in vals):
            lines.append(f"| {label} | " + " | ".join(_num(v) for v in vals) + " |")
    return "\n".join(lines)


def plot(named: list, path, xlabel: str, tag: str = "hybrid") -> Path:
    """The ``PLOTTED`` numbers against the column names read as numbers (e.g. the grid size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(n) for n, _ in named]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for label in PLOTTED:
        path_ = dict(HEADLINE)[label]
        ax.plot(xs, [get_path(r.get(tag, {}), path_) for _, r in named], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybrid_ct.evaluate.compare", description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="+", metavar="NAME=RESULTS_JSON[#twin]")
    ap.add_argument("--out", default=None, help="Markdown file (default: print the table)")
    ap.add_argument("--title", default="Side by side")
    ap.add_argument("--intro", default="", help="a paragraph under the title (what was built, the command)")
    ap.add_argument("--plot", default=None, help="PNG of the main numbers against the names read as numbers")
    ap.add_argument("--xlabel", default="setting")
    args = ap.parse_args(argv)
    named = []
    for b in args.builds:
        name, sep, path = b.partition("=")
        path, _, which = path.partition("#")  # RESULTS_JSON#twin: the --twin model of that evaluation
        if not sep or not Path(path).is_file():
            raise SystemExit(f"expected NAME=RESULTS_JSON[#twin] with an existing file, got {b!r}")
        res = json.loads(Path(path).read_text())
        named.append((name, {"hybrid": res.get(which or "hybrid", {})}))
    text = table(named)
    if args.out:
        parts = [f"# {args.title}", "", args.intro, "", text]
        if args.plot:
            png = plot(named, args.plot, args.xlabel)
            rel = png.relative_to(Path(args.out).parent) if png.is_relative_to(Path(args.out).parent) else png
            parts += ["", f"![{args.xlabel}]({rel.as_posix()})"]
        Path(args.out).write_text("\n".join(parts) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
