"""A training run's settings (``TrainConfig``) and which slices each epoch draws (``epoch_indices``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hybrid_ct.contract import LAMBDAS, SEG_LOSS
from hybrid_ct.data.slice_store import SliceSet


def epoch_indices(data: SliceSet, negative_fraction: float, rng: np.random.Generator,
                  errors: np.ndarray | None = None, hard: float = 0.0) -> np.ndarray:
    """All slices with something positive to learn + a fresh random share of the negatives (seed 002: 20 %).
    Hard negatives: with ``hard`` > 0 and ``errors`` (per slice, NaN where not yet
    seen: ``trainer.negative_errors`` when the model last trained on it), the ``hard`` share of the
    negatives that the model got most wrong comes twice and as many random ones sit out, so the number of
    negatives (and the class balance) is unchanged while the worst are twice as likely to be in a
    truncated epoch; ``hard`` = 0 draws exactly as before."""
    pos = np.flatnonzero(data.cls != 0)
    neg = np.flatnonzero(data.cls == 0)
    k = int(math.ceil(len(neg) * negative_fraction)) if len(neg) else 0
    chosen = rng.choice(neg, size=k, replace=False) if k else np.zeros(0, int)
    if hard > 0 and errors is not None and k:
        e = errors[neg]
        seen = np.flatnonzero(~np.isnan(e))
        worst = neg[seen[np.argsort(-e[seen], kind="stable")][: min(int(round(hard * k)), k // 2)]]
        others = chosen[~np.isin(chosen, worst)][: k - 2 * len(worst)]
        chosen = np.concatenate([worst, worst, others])
    idx = np.concatenate([pos, chosen])
    rng.shuffle(idx)
    return idx


@dataclass
class TrainConfig:
    """Everything a training run takes, with the one set of defaults: the CLI recipes and the MONAI Label
    app's train requests (``HybridCTTrain.train_config``) both build one."""

    epochs: int = 10
    batch_size: int = 8  # per process (a distributed run's global batch is batch_size x world size)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    negative_fraction: float = 0.2
    augment: bool = True
    style_augment: bool = False  # + gamma, contrast, blur, low resolution, JPEG (augmentations(style=True))
    rotate_pictures: bool = False  # + 90-degree turns and flips of 2D pictures (not of HU volumes)
    seg_loss: str = SEG_LOSS["lung"]  # defaults: contract.json "heads"
    infection_loss: str | None = SEG_LOSS["infection"]
    lambdas: dict = field(default_factory=lambda: dict(LAMBDAS))
    adaptive_cls: bool = False
    max_iters_per_epoch: int | None = None  # None or 0: the whole epoch sample
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    val_batch_size: int | None = None  # None: batch_size
    spike_rate_weight: float = 0.0  # > 0: add weight x mean firing rate of the spiking layers (sparse spikes)
    context_dropout: float = 0.0  # 2.5D input: share of training slices shown without neighbours (SliceDataset)
    hard_negatives: float = 0.0  # share of each epoch's negatives that are the model's worst (epoch_indices)
    # share of infection-free HU slices with a lung mask given a synthetic lesion (data.lesions), and
    # share of HU slices shown under a random scan protocol (data.protocol); 0: training as before
    synth_lesions: float = 0.0
    protocol_aug: float = 0.0
    # BatchNorm layers keep the running statistics they came with (eval mode) while the rest trains: a fine-tune
    # on a few corrected scans otherwise re-estimates them from batches of those scans and the replay
    freeze_bn: bool = False


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
