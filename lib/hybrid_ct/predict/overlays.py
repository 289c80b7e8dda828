"""Lung / infection overlays on CT slices (the PNGs of ``predict``, the PDF page, the Slicer pictures), and the
figure helpers every plot uses. Matplotlib's object API with the Agg canvas (no pyplot state, no display
needed): safe in servers, tests and headless machines."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from hybrid_ct.contract import COLORS, LABELS


LUNG_COLOR, INFECTION_COLOR = (tuple(c / 255.0 for c in COLORS[k]) for k in ("lung", "infection"))


REFERENCE_COLOR = "cyan"  # a reference infection outline must not look like the (yellow) predicted one


def new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def overlay_panels(panels: list, path, ncols: int | None = None) -> Path:
    """``panels``: list of (image2d in [0, 1], label2d (contract values) or None, title). Contours in the contract's
    lung and infection colours (a reference label can be passed as a 4th element, drawn dashed cyan)."""
    n = max(len(panels), 1)
    ncols = ncols or min(n, 3)
    nrows = int(math.ceil(n / ncols))
    fig = new_figure(3.6 * ncols, 3.8 * nrows)
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
    return save_figure(fig, path)


def results_view(image2d, label2d, colors: dict, lines: list, path, title: str = "") -> Path:
    """A Slicer-like view: one slice with filled, outlined segments (``colors``: label value -> RGB
    0-255) beside a results panel (``lines``: (field, value) pairs)."""
    img = np.clip(np.asarray(image2d, float), 0, 1)
    lab = np.asarray(label2d)
    rgb = np.repeat(img[..., None], 3, axis=2)
    texts = [(field, textwrap.fill(str(value), 52)) for field, value in lines]
    # the panel sets the height: each field as tall as its wrapped text (inches), so a long call or density
    # note never runs into the next field or off the picture
    heights = [0.22 + 0.155 * (t.count("\n") + 1) + 0.1 for _, t in texts]
    fig_h = max(4.6, sum(heights) + 0.75)
    fig = new_figure(9.5, fig_h)
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
    panel = fig.add_axes([0.52, 0.0, 0.46, 1.0])
    panel.set_axis_off()
    panel.text(0.0, 1.0 - 0.3 / fig_h, "Hybrid CT results", fontsize=10, va="top", transform=panel.transAxes)
    y = 0.7  # inches from the top
    for (field, text), h in zip(texts, heights):
        panel.text(0.0, 1.0 - y / fig_h, f"{field}:", fontsize=9, weight="bold", va="top", transform=panel.transAxes)
        panel.text(0.0, 1.0 - (y + 0.22) / fig_h, text, fontsize=8.5, va="top", transform=panel.transAxes)
        y += h
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
