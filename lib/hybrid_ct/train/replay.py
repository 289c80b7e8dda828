"""The replay sample beside a checkpoint (``<model>.replay.npz``): the slices of its own training data that the
app's retraining mixes with the radiologist's corrections, so that a few corrected scans do not make it forget.

``hybrid-ct train`` writes it (``write_replay``). It is derived from the data sets and never committed
(.gitignore), so the package's shipped model arrives without one, and a server started from it fine-tuned on
the corrections alone: measured with the shipped network through the real server (docs/active_learning_shipped.md),
both promoted retrains lowered the test Dice. ``rebuild_replay`` (``hybrid-ct replay``, run by scripts/serve.sh
when the real data is there) rebuilds it from the checkpoint's own recipe and split.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hybrid_ct.data.manifest import data_root
from hybrid_ct.data.slice_store import SliceSet, replay_path, save_replay
from hybrid_ct.errors import InputError
from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.net.network import NetConfig
from hybrid_ct.train.recipes import recipe_slices


def write_replay(train: SliceSet, cfg: NetConfig, path, seed: int = 0) -> int:
    """A sample of the training slices ``train`` for a network ``cfg`` -> ``path``; the slices written."""
    replay = train if cfg.in_channels == 3 else replace(train, context=None)  # neighbours only for a 2.5D net
    return save_replay(replay, path, seed=seed)


def rebuild_replay(checkpoint, data=None, out=None, progress: bool = True) -> tuple[Path, int]:
    """The replay sample of ``checkpoint`` rebuilt from its recipe (``meta["recipe"]``) on the real data in
    ``data``, refused unless the recipe's split gives the checkpoint's own validation groups (else the sample
    could hold slices the model was validated on). -> (path written, slices)."""
    _, meta = load_checkpoint(checkpoint)
    recipe = meta.get("recipe")
    if not isinstance(recipe, dict) or "data" not in recipe:
        raise InputError(f"{checkpoint}: no training recipe in its meta: its replay sample cannot be rebuilt")
    _, val_groups, _, _, train, _, _ = recipe_slices(recipe, data_root(data), progress)
    if sorted(val_groups) != sorted(meta.get("val_groups") or []):
        raise InputError(f"{checkpoint}: the data in {data_root(data)} splits into other validation groups than the "
                         "checkpoint's: not the data it was trained on")
    out = Path(out) if out else replay_path(checkpoint)
    return out, write_replay(train, NetConfig(**recipe["net"]), out, seed=int(recipe["train"].get("seed", 0)))
