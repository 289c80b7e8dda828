"""Figures for evaluation reports: ROC curves, training curves, firing rates (Agg canvas, as ``predict.overlays``)."""
from __future__ import annotations

import math
from pathlib import Path
from hybrid_ct.predict.overlays import new_figure
from hybrid_ct.predict.overlays import save_figure






def roc_plot(curves: dict, path, title: str = "ROC, per-slice classification (validation)") -> Path:
    """``curves``: name -> {"fpr": [...], "tpr": [...], "auc": float}."""
    fig = new_figure(4.8, 4.5)
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
    return save_figure(fig, path)


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
    fig = new_figure(11, 3.8)
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
    return save_figure(fig, path)


def firing_rates_plot(rates: dict, path, title: str = "measured firing rate per spiking layer") -> Path:
    names = list(rates)
    fig = new_figure(max(6, 0.22 * len(names) + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), [100 * rates[n] for n in names], color="#3498db")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(".act", "").replace("encoder.levels.", "enc") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("spikes / (neurons x T)  [%]")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)



__all__ = ["roc_plot", "training_curves", "firing_rates_plot"]
