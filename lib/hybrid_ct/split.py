"""Deterministic splits by hashing a key: the same patient, study or image id always lands on the same side."""
from __future__ import annotations

import hashlib


def hash_fraction(key: str, salt: str = "") -> float:
    """A stable number in [0, 1] for ``key`` (sha256; independent of the Python hash seed)."""
    return int(hashlib.sha256(f"{salt}{key}".encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_by_group(groups, val_fraction: float = 0.2, seed: int = 0):
    """Deterministic train/val split by group id (patient / study): no group is on both sides."""
    uniq = sorted(set(groups))
    def h(g):
        return hash_fraction(g, f"{seed}:")
    val_groups = {g for g in uniq if h(g) < val_fraction}
    if not val_groups and len(uniq) > 1:
        val_groups = {min(uniq, key=h)}
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    val = [i for i, g in enumerate(groups) if g in val_groups]
    return train, val
