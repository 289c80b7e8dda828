"""The real-data folder and its MANIFEST: where the data is, which patient or study each file belongs to
(group ids, canonical across collections), and splits by group so that no patient is on both sides."""
from __future__ import annotations

import csv
import hashlib
import os
import re
from pathlib import Path


from hybrid_ct.errors import InputError
from hybrid_ct.data.slice_store import SliceSet
from hybrid_ct.data.slice_store import SourceSet
from hybrid_ct.split import split_by_group
from hybrid_ct.data.slice_store import stack_sets


DATA_ENV = "HYBRID_CT_DATA"


REPO_ROOT = Path(__file__).resolve().parents[3]


def data_root(path=None) -> Path:
    """The real-data folder: ``path``, else $HYBRID_CT_DATA, else ``../shared/data`` beside the repository."""
    p = Path(path or os.environ.get(DATA_ENV) or REPO_ROOT.parent / "shared" / "data")
    return p


def require_data_root(path=None) -> Path:
    root = data_root(path)
    if not (root / "MANIFEST.csv").is_file():
        raise InputError(f"no real data at {root} (MANIFEST.csv missing): pass --data DIR or set ${DATA_ENV}")
    return root


def read_manifest(root) -> list:
    with open(Path(root) / "MANIFEST.csv", newline="") as f:
        return list(csv.DictReader(f))


_CORONA = re.compile(r"coronacases_(?:org_)?(?:case)?0*(\d+)")


_RADIO = re.compile(r"radiopaedia(?:_org_covid-19-pneumonia)?[-_]0*(\d+)")


def canonical_group(group_id: str) -> str:
    """One id per patient where the same patient appears under several names.

    Ma Jun's 20-case set is named ``coronacases_org_001`` (images), ``coronacases_001`` (masks),
    ``radiopaedia-14`` and ``radiopaedia_14_85914_0`` (two scans of patient 29 / 10 share the number):
    all become ``majun20_coronacases_001`` / ``majun20_radiopaedia_14``.
    """
    g = str(group_id).strip()
    m = _CORONA.search(g)
    if m:
        return f"majun20_coronacases_{int(m.group(1)):03d}"
    m = _RADIO.search(g)
    if m:
        return f"majun20_radiopaedia_{int(m.group(1))}"
    return g


def stable_order(keys, seed=0):
    """Deterministic pseudo-random order, salted differently from ``split_by_group``'s hash (a subset
    picked by this order must not all fall on one side of the split)."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"subset-{seed}:{k}".encode()).hexdigest())


def group_family(group_id: str) -> str:
    """The collection a (canonical) group id comes from, its prefix: ``ucsd``, ``mosmed``, ``majun20``, ``medseg``,
    ``imlab``, ``phantom``... (they differ in scanner, crop and window: classification is reported per collection)."""
    return str(group_id).split("_", 1)[0]


def val_groups_for(sets: list, val_fraction: float = 0.2, seed: int = 0) -> set:
    """Validation groups: ``training.split_by_group`` within each source and family (so every source and
    every collection inside cls2d -- UCSD, MosMed, Ma Jun -- with 2+ groups has some in validation),
    united; a group id that occurs in several sources (Ma Jun's patients) is on the same side everywhere."""
    val = set()
    for s in sets:
        fams = {}
        for g in s.slices.group:
            fams.setdefault(group_family(g), []).append(g)
        for fam, groups in fams.items():
            if len(set(groups)) < 2 or fam == "wholescan":  # whole scans: validated by the scan-level check
                continue
            _, vi = split_by_group(groups, val_fraction, seed)
            val |= {groups[i] for i in vi}
    return val


def split_sets(sets: list, val_groups) -> tuple:
    """-> (train SourceSets, val SourceSets): each slice goes by its group; no group on both sides."""
    val_groups = set(val_groups)
    train, val = [], []
    for s in sets:
        g = s.slices.group
        vi = [i for i in range(len(g)) if g[i] in val_groups]
        ti = [i for i in range(len(g)) if g[i] not in val_groups]
        for side, idx in ((train, ti), (val, vi)):
            files = [s.files[i] for i in idx] if len(s.files) == len(g) else []
            side.append(SourceSet(s.name, s.slices.subset(idx), s.weak_lung, files))
    return train, val


def combine(sets: list, size: int) -> SliceSet:
    return stack_sets([s.slices for s in sets if len(s)], size)


def read_slice_labels(path) -> dict:
    """P001_slice_labels.csv / cap001 slice_labels.csv -> {z: infected 0/1} (SimpleITK slice index)."""
    with open(path, newline="") as f:
        return {int(r.get("nifti_z_index") or r["z_index"]): int(r["infection"]) for r in csv.DictReader(f)}
