"""Training recipes (JSON files shipped in ``hybrid_ct/train/recipes/``) and the data a recipe names.

A recipe is ``{"net": NetConfig fields, "train": TrainConfig fields (+ "from_twin": conversion), "data":
sources, phantoms, split, oversampling}``. Keys starting with ``_`` are notes (``"_comment"``) and are
dropped on loading. ``resolve_recipe`` applies the ``hybrid-ct train`` overrides; ``recipe_slices``
loads and splits the recipe's data the way training and ``hybrid-ct evaluate`` see it.

Leave-one-source-out: ``recipe["data"]["hold_out"]`` names a collection (``datasets.group_family``:
``ucsd``, ``mosmed``, ``majun20``); every group of it, in every source, goes to validation and none to
training, so the model is scored on a collection it has never seen (``hybrid-ct train --hold-out-source``,
``scripts/loso.sh``, ``hybrid-ct evaluate --loso``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hybrid_ct.processing.context import CONTEXT_MM
from hybrid_ct.errors import InputError
from hybrid_ct.processing.grid import check_size
from hybrid_ct.data.slice_store import MISSING, SourceSet
from hybrid_ct.data.manifest import combine, group_family, split_sets, val_groups_for
from hybrid_ct.data.sources import load_sources
from hybrid_ct.net.network import NetConfig

from hybrid_ct.train.recipe_files import HOLD_OUT_SOURCES, RECIPE_DIR, recipe_names  # noqa: F401 (re-exported)
ENERGY_RATIO_TARGET = 0.2  # seed 002: the hybrid network costs >= 80 % less energy than its CNN


def _strip_notes(obj):
    if isinstance(obj, dict):
        return {k: _strip_notes(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_strip_notes(v) for v in obj]
    return obj


def _merged(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top: nested dicts merged key by key, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_recipe(name_or_path) -> dict:
    """A shipped recipe by name (``"shipped"``, ``"quick"``) or a recipe JSON file; notes dropped."""
    p = Path(name_or_path)
    if not (p.suffix == ".json" and p.is_file()):
        p = RECIPE_DIR / f"{name_or_path}.json"
        if not p.is_file():
            raise InputError(f"no recipe {name_or_path!r}: shipped recipes are {', '.join(recipe_names())}, "
                             "or give a recipe .json file")
    with open(p) as f:
        r = _strip_notes(json.load(f))
    if "base" in r:  # a variant: only what differs from its base recipe
        r = _merged(load_recipe(r.pop("base")), r)
    net = r.get("net", {})
    if float(net.get("context_mm", CONTEXT_MM)) != CONTEXT_MM:  # the data loaders stack neighbours at CONTEXT_MM
        raise InputError(f"recipe {name_or_path}: context_mm must be {CONTEXT_MM} (hybrid_ct.processing.context.CONTEXT_MM)")
    return r


def resolve_recipe(name: str, epochs=None, max_iters=None, batch_size=None, seed=None, phantoms=None, limit=None,
                   sources=None, no_weak_lung: bool = False, extra=(), hold_out=None, in_size=None,
                   fine_tune_epochs=None) -> dict:
    """The recipe ``name`` with the ``hybrid-ct train`` overrides applied (None: keep the recipe's value;
    ``limit`` 0: all slices; ``sources`` a comma list; ``hold_out`` a collection left out of training,
    see ``recipe_slices``)."""
    r = load_recipe(name)
    t, d = r["train"], r["data"]
    if epochs is not None:
        t["epochs"] = epochs
    if max_iters is not None:
        t["max_iters_per_epoch"] = max_iters
    if batch_size is not None:
        t["batch_size"] = batch_size
    if seed is not None:
        t["seed"] = seed
    if phantoms is not None:
        d["phantoms"] = phantoms
    if limit is not None:
        d["limit"] = limit or None
    if sources:
        d["sources"] = [s for s in sources.split(",") if s]
    if no_weak_lung:
        d["weak_lung"] = False
    d["extra"] = [str(Path(e).resolve()) for e in (extra or [])]
    if hold_out:
        d["hold_out"] = hold_out
    if fine_tune_epochs is not None:
        if not t.get("from_twin"):
            raise InputError(f"recipe {name!r} does not fine-tune a converted twin: no --fine-tune-epochs")
        t["from_twin"]["epochs"] = int(fine_tune_epochs)
    if in_size is not None:
        div = 2 ** (int(r["net"].get("levels", 5)) - 1)
        if check_size(in_size) % div:
            raise InputError(f"--in-size must be a multiple of {div} for this recipe's network, got {in_size}")
        r["net"]["in_size"] = int(in_size)
    r["name"] = name
    return r


# ----------------------------------------------------------------------------------------------------
# the recipe's data

def load_recipe_data(recipe: dict, root, size: int, progress: bool = True) -> list:
    d = recipe["data"]
    return load_sources(root, size, sources=d["sources"], phantoms=d["phantoms"], phantom_shape=tuple(d["phantom_shape"]),
                        limit=d.get("limit"), extra=d.get("extra", []), weak_lung=d.get("weak_lung", True),
                        normal_infection=d.get("normal_infection", False), progress=progress,
                        fov=NetConfig.from_dict(recipe["net"]).input_spec())  # what the network will see


def recipe_slices(recipe: dict, root, progress: bool = True):
    """The recipe's data, split by group id: -> (sets, val_groups, train_sets, val_sets, train, val,
    curve_val); ``train`` capped per group and oversampled, ``curve_val`` the subset scored per epoch."""

    d, size = recipe["data"], recipe["net"]["in_size"]
    sets = load_recipe_data(recipe, root, size, progress=progress)
    val_groups = val_groups_for(sets, d["val_fraction"], d["split_seed"])
    if d.get("hold_out"):
        val_groups |= held_out_groups(sets, d["hold_out"])
    val_groups = sorted(val_groups)
    train_sets, val_sets = split_sets(sets, val_groups)
    train_sets = _capped(train_sets, d.get("max_per_group", {}), d["split_seed"])
    if d.get("pseudo"):  # after the split: only training slices are ever pseudo-labelled
        from hybrid_ct.train.pseudo_labels import pseudo_label

        train_sets, recipe["pseudo_summary"] = pseudo_label(train_sets, d["pseudo"], progress)
    train = _oversampled(train_sets, d.get("oversample", {}), size)
    val = combine(val_sets, size)
    curve_val = _curve_subset(val, d.get("curve_val_slices"), recipe["train"].get("seed", 0))
    return sets, val_groups, train_sets, val_sets, train, val, curve_val


def held_out_groups(sets: list, family: str) -> set:
    """Every group of collection ``family`` (``datasets.group_family``) in ``sets``; InputError when there is none."""

    groups = {g for s in sets for g in s.slices.group if group_family(g) == family}
    if not groups:
        found = sorted({group_family(g) for s in sets for g in s.slices.group})
        raise InputError(f"no data of collection {family!r} to hold out: the loaded groups are of {', '.join(found)}")
    return groups


def _capped(sets: list, caps: dict, seed: int = 0) -> list:
    """At most ``caps[name]`` slices per group (patient / study) of that source, drawn at random with
    ``seed``: a few patients with hundreds of slices (Ma Jun's 11 cases: 1,092 positive pictures) must
    not teach the classifier what *their* scans look like instead of what infection looks like."""

    out = []
    for s in sets:
        cap = caps.get(s.name)
        if not cap:
            out.append(s)
            continue
        rng = np.random.default_rng(seed)
        groups = np.asarray(s.slices.group, dtype=object)
        keep = []
        for g in dict.fromkeys(s.slices.group):
            idx = np.flatnonzero(groups == g)
            keep += sorted(rng.choice(idx, size=cap, replace=False).tolist()) if len(idx) > cap else idx.tolist()
        keep = sorted(keep)
        files = [s.files[i] for i in keep] if len(s.files) == len(s) else s.files
        out.append(SourceSet(s.name, s.slices.subset(keep), s.weak_lung, files))
    return out


def _oversampled(sets: list, factors: dict, size: int):
    """Repeat each source ``factors[name]`` times; ``factors["<name>/negative"]`` repeats only its
    class-0 slices (balances a source whose positives outnumber its negatives)."""

    parts = []
    for s in sets:
        n = max(1, int(factors.get(s.name, 1)))
        parts += [s] * n
        neg = max(1, int(factors.get(f"{s.name}/negative", 1)))
        if neg > 1:
            negatives = SourceSet(s.name, s.slices.subset(np.flatnonzero(s.slices.cls == 0)))
            parts += [negatives] * (n * (neg - 1))
    return combine(parts, size)


def _curve_subset(val, n: int | None, seed: int = 0):
    """A fixed validation subset for the per-epoch curves: slices with both masks first, then others."""

    if not n or len(val) <= n:
        return val
    rng = np.random.default_rng(seed)
    both = np.array([val.lung[i, 0, 0] != MISSING and val.infection[i, 0, 0] != MISSING for i in range(len(val))])
    first = rng.permutation(np.flatnonzero(both))[: n // 2]
    rest = rng.permutation(np.setdiff1d(np.arange(len(val)), first))[: n - len(first)]
    return val.subset(np.sort(np.concatenate([first, rest])))
