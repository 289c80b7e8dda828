"""Slice datasets, validation metrics and the training entry ``fit`` shared by the CLI and the MONAI
Label trainer.

Every sample is one model-space slice ``[1, S, S]`` with whatever targets its source has: lung mask,
infection mask, class (1 positive). Missing targets are masked out of the loss, so 2D sets with only
an infection mask or only a class label train the heads they can.

The loop itself is ``hybrid_ct.train.trainer.Trainer`` (one loop for ``fit`` / ``hybrid-ct train``, the app's
``HybridCTTrain`` and ``torchrun -m hybrid_ct.train.distributed``), configured by ``TrainConfig`` below.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from hybrid_ct.contract import SEG_HEADS
from hybrid_ct.train.metrics import SegmentationMeter, classification_metrics
from hybrid_ct.net.network import HybridMultiTaskNet, batchnorms
from hybrid_ct.train.augment import SliceDataset
from hybrid_ct.data.slice_store import SliceSet
from hybrid_ct.train.config import to_device



@torch.no_grad()
def recalibrate_batchnorm(model: HybridMultiTaskNet, data: SliceSet, n_slices: int = 240, batch_size: int = 8,
                          device="cpu", seed: int = 0) -> int:
    """Re-estimate every BatchNorm's running mean / variance from ``n_slices`` random training slices
    (cumulative average, no augmentation, no gradient): after ``model.from_twin`` the layers see spikes,
    not ReLU outputs, and the twin's statistics no longer hold. Returns the number of slices used."""
    bns = batchnorms(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    idx = np.random.default_rng(seed).permutation(len(data))[:n_slices]
    model.to(device).train()
    try:
        with torch.no_grad():
            for batch in DataLoader(SliceDataset(data.subset(idx), channels=model.cfg.in_channels), batch_size=batch_size):
                model(batch["image"].to(device))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
    model.eval()
    return len(idx)


def evaluate(model: HybridMultiTaskNet, data: SliceSet, batch_size: int = 8, device="cpu", progress=False) -> dict:
    """Slice-level metrics: lung / infection Dice etc. (where masks exist) and classification (where known)."""
    model.eval()
    meter = SegmentationMeter()
    scores, truth = [], []
    loader = DataLoader(SliceDataset(data, channels=model.cfg.in_channels), batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        b = to_device(batch, device)
        out = model(b["image"])
        heads = model.cfg.heads
        for i in range(len(b["image"])):
            if "lung" in heads and "infection" in heads and b["lung_mask"][i] and b["infection_mask"][i]:
                pred = (torch.sigmoid(out["lung"][i, 0]) > 0.5).long()
                pred[(pred == 1) & (torch.sigmoid(out["infection"][i, 0]) > 0.5)] = 2
                true = b["lung"][i, 0].long()
                true[b["infection"][i, 0] > 0] = 2
                meter.update(pred.cpu(), true.cpu())
        if "cls" in heads:
            m = b["cls_mask"].bool()
            scores += model.positive_probability(out)[m].cpu().tolist()
            truth += b["cls"][m].cpu().tolist()
    seg = meter.compute()
    cls = classification_metrics(truth, scores) if truth else {}
    return {"seg": seg, "cls": cls, "score": validation_score(seg, cls)}


def validation_score(seg: dict, cls: dict) -> float:
    """One number in [0, 1] to pick the best model: mean of the lung Dice, infection Dice and
    classification AUC (accuracy when the AUC is undefined) that are available."""
    parts = []
    for name in SEG_HEADS:
        if seg.get(name, {}).get("n_cases"):
            parts.append(seg[name]["dice"])
    if cls:
        auc = cls.get("auc", float("nan"))
        parts.append(auc if not math.isnan(auc) else cls["accuracy"])
    parts = [p for p in parts if not math.isnan(p)]
    return float(np.mean(parts)) if parts else 0.0


