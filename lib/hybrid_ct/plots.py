"""Figures for reports: ROC curves, training curves, firing rates, lung / infection overlays.

Matplotlib's object API with the Agg canvas (no pyplot state, no display needed): safe in servers,
tests and headless machines.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from .contract import COLORS, LABELS

LUNG_COLOR, INFECTION_COLOR = (tuple(c / 255.0 for c in COLORS[k]) for k in ("lung", "infection"))
REFERENCE_COLOR = "cyan"  # a reference infection outline must not look like the (yellow) predicted one


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def roc_plot(curves: dict, path, title: str = "ROC, per-slice classification (validation)") -> Path:
    """``curves``: name -> {"fpr": [...], "tpr": [...], "auc": float}."""
    fig = _figure(4.8, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for name, c in curves.items():
        if c and len(c.get("fpr", [])):
            auc = c.get("auc", float("nan"))
            ax.plot(c["fpr"], c["tpr"], lw=2, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _series(history: list, *keys):
    out = []
    for h in history:
        v = h
        for k in keys:
            v = v.get(k, {}) if isinstance(v, dict) else {}
        out.append(float(v) if isinstance(v, (int, float)) else math.nan)
    return out


def training_curves(histories: dict, path) -> Path:
    """``histories``: name -> fit() history (list of per-epoch dicts). Loss and validation curves."""
    fig = _figure(11, 3.8)
    ax_loss, ax_seg, ax_cls = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    for name, hist in histories.items():
        if not hist:
            continue
        ep = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        ax_loss.plot(ep, _series(hist, "loss", "total"), marker="o", label=f"{name} total")
        for part, ls in (("cls", ":"), ("lung", "--"), ("infection", "-.")):
            ys = _series(hist, "loss", part)
            if not all(math.isnan(y) for y in ys):
                ax_loss.plot(ep, ys, ls=ls, label=f"{name} {part}")
        ax_seg.plot(ep, _series(hist, "val", "seg", "lung", "dice"), marker="o", label=f"{name} lung")
        ax_seg.plot(ep, _series(hist, "val", "seg", "infection", "dice"), marker="s", ls="--", label=f"{name} infection")
        ax_cls.plot(ep, _series(hist, "val", "cls", "auc"), marker="o", label=f"{name} AUC")
        ax_cls.plot(ep, _series(hist, "val", "cls", "accuracy"), marker="s", ls="--", label=f"{name} accuracy")
    ax_loss.set_title("training loss", fontsize=10)
    ax_seg.set_title("validation Dice (slices with lung + infection masks)", fontsize=9)
    ax_cls.set_title("validation classification", fontsize=10)
    for ax in (ax_loss, ax_seg, ax_cls):
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax_seg.set_ylim(0, 1)
    ax_cls.set_ylim(0, 1)
    return _save(fig, path)


def firing_rates_plot(rates: dict, path, title: str = "measured firing rate per spiking layer") -> Path:
    names = list(rates)
    fig = _figure(max(6, 0.22 * len(names) + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), [100 * rates[n] for n in names], color="#3498db")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(".act", "").replace("encoder.levels.", "enc") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("spikes / (neurons x T)  [%]")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def overlay_panels(panels: list, path, ncols: int | None = None) -> Path:
    """``panels``: list of (image2d in [0, 1], label2d 0/1/2 or None, title). Contours in the contract's
    lung and infection colours (a reference label can be passed as a 4th element, drawn dashed cyan)."""
    n = max(len(panels), 1)
    ncols = ncols or min(n, 3)
    nrows = int(math.ceil(n / ncols))
    fig = _figure(3.6 * ncols, 3.8 * nrows)
    for i, panel in enumerate(panels):
        img, lab, title = panel[:3]
        ref = panel[3] if len(panel) > 3 else None
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(np.asarray(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if lab is not None:
            lab = np.asarray(lab)
            for value, color in ((LABELS["lung"], LUNG_COLOR), (LABELS["infection"], INFECTION_COLOR)):
                m = lab >= value if value == 1 else lab == value
                if m.any() and not m.all():
                    ax.contour(m.astype(float), levels=[0.5], colors=color, linewidths=1.0)
        if ref is not None:
            r = np.asarray(ref) == LABELS["infection"]
            if r.any() and not r.all():
                ax.contour(r.astype(float), levels=[0.5], colors=REFERENCE_COLOR, linewidths=0.8, linestyles="dashed")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    return _save(fig, path)


def results_view(image2d, label2d, colors: dict, lines: list, path, title: str = "") -> Path:
    """A Slicer-like view: one slice with filled, outlined segments (``colors``: label value -> RGB
    0-255) beside a results panel (``lines``: (field, value) pairs)."""
    img = np.clip(np.asarray(image2d, float), 0, 1)
    lab = np.asarray(label2d)
    rgb = np.repeat(img[..., None], 3, axis=2)
    fig = _figure(9.5, 4.6)
    ax = fig.add_axes([0.01, 0.02, 0.47, 0.9])
    for value, color in colors.items():
        m = lab == value
        c = np.asarray(color, float) / 255.0
        rgb[m] = 0.5 * rgb[m] + 0.5 * c  # Slicer's default 2D fill opacity is 0.5
    ax.imshow(rgb, interpolation="nearest")
    for value, color in colors.items():
        m = lab == value
        if m.any() and not m.all():
            ax.contour(m.astype(float), levels=[0.5], colors=[np.asarray(color, float) / 255.0], linewidths=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    panel = fig.add_axes([0.52, 0.02, 0.46, 0.9])
    panel.set_axis_off()
    panel.set_title("Hybrid CT results", fontsize=10, loc="left")
    for i, (field, value) in enumerate(lines):
        y = 0.92 - i * 0.14
        panel.text(0.0, y, f"{field}:", fontsize=9, weight="bold", va="top", transform=panel.transAxes)
        panel.text(0.0, y - 0.045, textwrap.fill(str(value), 52), fontsize=8.5, va="top", transform=panel.transAxes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


__all__ = ["roc_plot", "training_curves", "firing_rates_plot", "overlay_panels", "results_view"]
