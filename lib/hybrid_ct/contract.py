"""The label and report contract (``contract.json`` beside this file), as Python values.

``contract.json`` is the ONE table of label values, names, synonyms, colours, terminology codes, the
network's heads (what each learns, its loss and lambda, where it is reported) and report keys; the core,
the MONAI Label app, the plots and (through a byte-identical copy, because the Slicer extension ships
without this package) the Slicer extension all read it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

CONTRACT: dict = json.loads((Path(__file__).with_name("contract.json")).read_text(encoding="utf-8"))

_ENTRIES = CONTRACT["labels"]
LABELS: dict[str, int] = {d["name"]: d["value"] for d in _ENTRIES}
"""``{"background": 0, "lung": 1, "right_lung": 3, "left_lung": 4, "infection": 2}``: every value but 0 is lung;
infection lies inside the lung; 1 is lung without a side (older labels, corrections drawn as one lung)."""
LABEL_NAMES: dict[int, str] = {v: k for k, v in LABELS.items()}
FOREGROUND: dict[str, int] = {k: v for k, v in LABELS.items() if v}
"""The labels a radiologist may send back, in drawing order (a later one wins where segments overlap)."""
PREDICTED: dict[str, int] = {d["name"]: d["value"] for d in _ENTRIES if d["value"] and d.get("predicted", True)}
"""The labels a prediction holds: ``{"right_lung": 3, "left_lung": 4, "infection": 2}``."""
COLORS: dict[str, tuple[int, int, int]] = {d["name"]: tuple(d["color"]) for d in _ENTRIES if "color" in d}
"""RGB 0-255 per foreground label (the Slicer segment colours)."""
SEGMENT_NAMES: dict[str, str] = {d["name"]: d["segment"] for d in _ENTRIES if "segment" in d}

HEADS: dict[str, dict] = {h["name"]: h for h in CONTRACT["heads"]}
"""Every head, by name: ``kind`` classifier / segmentation (trained) or derived (computed after the network)."""
TRAINED_HEADS: tuple[str, ...] = tuple(n for n, h in HEADS.items() if h["kind"] != "derived")
"""The heads a network can have (``NetConfig.heads`` picks among them): ``("cls", "lung", "infection")``."""
SEG_HEADS: dict[str, tuple[int, ...]] = {n: tuple(LABELS[x] for x in h["labels"]) for n, h in HEADS.items()
                                          if h["kind"] == "segmentation"}
"""Each segmentation head's target: the label values whose union it learns (``{"lung": (1, 3, 4, 2), "infection": (2,)}``)."""
LAMBDAS: dict[str, float] = {n: float(h["lambda"]) for n, h in HEADS.items() if h["kind"] != "derived"}
SEG_LOSS: dict[str, str] = {n: h["loss"] for n, h in HEADS.items() if h["kind"] == "segmentation"}
SIDES: dict[str, int] = {side: LABELS[f"{side}_lung"] for side in ("right", "left")}
"""The sided lung values the derived head ``lung_sides`` writes: ``{"right": 3, "left": 4}``."""
PARENCHYMA: tuple[int, ...] = tuple(v for v in SEG_HEADS["lung"] if v not in SEG_HEADS["infection"])
"""Lung without infection, with or without a side: ``(1, 3, 4)``."""


def head_targets(label, seg_heads: dict | None = None) -> dict:
    """Label map (any array shape, contract values) -> ``{segmentation head: bool mask}``: each head's target is
    the union of its declared labels (``seg_heads``: another ``SEG_HEADS``-like table, e.g. a test's)."""
    import numpy as np

    lab = np.asarray(label)
    return {name: np.isin(lab, values) for name, values in (SEG_HEADS if seg_heads is None else seg_heads).items()}


REPORT: dict = CONTRACT["report"]
REPORT_KEYS: tuple[str, ...] = tuple(REPORT["keys"])
BURDEN_KEYS: tuple[str, ...] = tuple(REPORT["burden"])


def report_key(section: str, name: str) -> str:
    """``name``, a key of the report's ``section`` ("keys": the top level), checked against the contract: code
    reads report keys by name, never by position, so a key added to the contract moves no other."""
    keys = REPORT["keys"] if section == "keys" else REPORT[section]
    if name not in keys:
        raise KeyError(f"report key {name!r} is not in contract.json's report {section!r}: {list(keys)}")
    return name


def normalise_name(name: str) -> str:
    """Lower case; runs of blanks, '_' and '-' become one blank; no surrounding blanks."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


_CANONICAL = {normalise_name(s): d["name"] for d in _ENTRIES for s in [d["name"], *d["synonyms"]]}


def _check_heads() -> None:
    for name, h in HEADS.items():
        for label in h.get("labels", []):
            if label not in LABELS:
                raise ValueError(f"contract.json head {name!r} names label {label!r}, not in the labels")
        if h["kind"] == "derived" and h["from"] not in SEG_HEADS:
            raise ValueError(f"contract.json derived head {name!r} derives from {h['from']!r}, not a segmentation head")
        report_key("keys", h["report"])


def canonical_name(name) -> str | None:
    """'Lungs', 'lung_left', 'GGO', 'COVID-19' ... -> 'lung' / 'left_lung' / 'infection' / 'background'; None if
    unknown."""
    return _CANONICAL.get(normalise_name(name)) if isinstance(name, str) else None


_check_heads()

__all__ = ["CONTRACT", "LABELS", "LABEL_NAMES", "FOREGROUND", "PREDICTED", "HEADS", "TRAINED_HEADS", "SEG_HEADS",
           "LAMBDAS", "SEG_LOSS", "SIDES", "PARENCHYMA", "head_targets", "COLORS", "SEGMENT_NAMES", "REPORT", "REPORT_KEYS",
           "BURDEN_KEYS", "report_key", "normalise_name", "canonical_name"]
