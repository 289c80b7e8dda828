"""Which recipes the package ships and which collections can be held out: what the command line needs to
build its parser, without the training code (``train.recipes`` imports the data and transform stack, MONAI
among it: ``hybrid-ct --help`` took ~6 s for that import, 2026-12-07)."""
from __future__ import annotations

from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
HOLD_OUT_SOURCES = ("ucsd", "mosmed", "majun20")  # the cls2d collections (``data.manifest.group_family``)


def recipe_names() -> list:
    """The recipes shipped in the package, sorted (``["quick", "shipped"]``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))
