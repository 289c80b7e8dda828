"""Slice datasets, validation metrics and the training entry ``fit`` shared by the CLI and the MONAI
Label trainer.

Every sample is one model-space slice ``[1, S, S]`` with whatever targets its source has: lung mask,
infection mask, class (1 positive). Missing targets are masked out of the loss, so 2D sets with only
an infection mask or only a class label train the heads they can.

The loop itself is ``hybrid_ct.trainer.Trainer`` (one loop for ``fit`` / ``hybrid-ct train``, the app's
``HybridCTTrain`` and ``torchrun -m hybrid_ct.train``), configured by ``TrainConfig`` below.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import (Compose, MapTransform, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised,
                              RandGaussianSmoothd, RandomizableTransform, RandRotate90d, RandScaleIntensityd,
                              RandSimulateLowResolutiond)
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import LABELS
from .metrics import SegmentationMeter, classification_metrics
from .model import HybridMultiTaskNet, batchnorms
from .context import neighbours, stack, with_context
from .preprocess import slice_spacing
from .transforms import model_slices

MISSING = 255  # mask value for "no target for this slice"


@dataclass
class SliceSet:
    """Model-space slices with optional targets; arrays are kept compact (uint8)."""

    images: np.ndarray  # [N,S,S] uint8 (x * 255)
    lung: np.ndarray  # [N,S,S] uint8 {0,1}, or MISSING
    infection: np.ndarray  # [N,S,S] uint8 {0,1}, or MISSING
    cls: np.ndarray  # [N] int8: 0 / 1, -1 unknown
    group: list = field(default_factory=list)  # patient / study id per slice (split by group)
    context: np.ndarray | None = None  # [N,2,S,S] uint8: the slices CONTEXT_MM below / above (volumes only)

    def __len__(self):
        return len(self.images)

    @staticmethod
    def empty(size: int) -> "SliceSet":
        z = np.zeros((0, size, size), np.uint8)
        return SliceSet(z, z.copy(), z.copy(), np.zeros(0, np.int8), [])

    def neighbours(self) -> np.ndarray:
        """The context slices; a picture's (no neighbours) repeat the slice itself."""
        return self.context if self.context is not None else np.repeat(self.images[:, None], 2, axis=1)

    def extend(self, other: "SliceSet") -> "SliceSet":
        ctx = None
        if self.context is not None or other.context is not None:
            ctx = np.concatenate([self.neighbours(), other.neighbours()])
        return SliceSet(np.concatenate([self.images, other.images]), np.concatenate([self.lung, other.lung]),
                        np.concatenate([self.infection, other.infection]), np.concatenate([self.cls, other.cls]),
                        list(self.group) + list(other.group), ctx)

    def subset(self, idx) -> "SliceSet":
        idx = np.asarray(idx, dtype=int)
        return SliceSet(self.images[idx], self.lung[idx], self.infection[idx], self.cls[idx],
                        [self.group[i] for i in idx], None if self.context is None else self.context[idx])

    def inputs(self, idx=None, channels: int = 1) -> np.ndarray:
        """Network input float32 [n, channels, S, S] in [0, 1]: the slice, or (3 channels, the 2.5D
        input of ``hybrid_ct.context``) the slice below, the slice, the slice above."""
        idx = np.arange(len(self)) if idx is None else np.atleast_1d(np.asarray(idx, dtype=int))
        x = self.images[idx][:, None].astype(np.float32) / 255.0
        if channels == 3 and self.context is not None:
            return stack(x, self.context[idx].astype(np.float32) / 255.0)
        return with_context(x, channels)  # a picture: its own neighbour


REPLAY_SLICES = 512  # slices of the original training data kept beside a checkpoint for retraining


def replay_path(checkpoint) -> "Path":
    """Where a checkpoint's replay sample lives: ``<model>.replay.npz`` beside it."""
    from pathlib import Path

    p = Path(checkpoint)
    return p.with_name(p.stem + ".replay.npz")


def save_replay(data: SliceSet, path, n: int = REPLAY_SLICES, seed: int = 0) -> int:
    """A random sample of ``n`` training slices (uint8, compressed) for the app's retraining to replay, so
    that fine-tuning on a few corrected scans does not forget the original data. -> slices written."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    s = data.subset(idx)
    extra = {} if s.context is None else {"context": s.context}
    np.savez_compressed(path, images=s.images, lung=s.lung, infection=s.infection, cls=s.cls,
                        group=np.asarray(s.group, dtype=str), **extra)
    return len(idx)


def load_replay(path, n: int | None = None, seed: int = 0) -> SliceSet:
    """The replay sample at ``path`` (``save_replay``), at most ``n`` slices of it drawn with ``seed``."""
    with np.load(path, allow_pickle=False) as z:
        s = SliceSet(z["images"], z["lung"], z["infection"], z["cls"].astype(np.int8),
                     [f"replay:{g}" for g in z["group"].tolist()], z["context"] if "context" in z.files else None)
    if n is not None and n < len(s):
        s = s.subset(np.sort(np.random.default_rng(seed).permutation(len(s))[:n]))
    return s


def slices_from_arrays(x: np.ndarray, label: np.ndarray | None, group: str, diagnosis: int | None = None,
                       lung_known: bool = True, infection_known: bool = True, dz_mm: float | None = None) -> SliceSet:
    """x [D,1,S,S] in [0,1]; label [D,S,S] with 0/1/2 or None. The slice class is "infection present"
    when the infection mask is known, else the scan's diagnosis if it is negative (all slices negative);
    slices of a positive scan without an infection mask have no class target. ``dz_mm``: x is a volume
    with this slice spacing, and each slice keeps its neighbours (``hybrid_ct.context``)."""
    d, s = x.shape[0], x.shape[-1]
    images = np.round(np.clip(x[:, 0], 0, 1) * 255).astype(np.uint8)
    miss = np.full((d, s, s), MISSING, np.uint8)
    lung = (label >= 1).astype(np.uint8) if label is not None and lung_known else miss
    inf = (label == LABELS["infection"]).astype(np.uint8) if label is not None and infection_known else miss.copy()
    if label is not None and infection_known:
        cls = inf.reshape(d, -1).any(1).astype(np.int8)
    elif diagnosis == 0:
        cls = np.zeros(d, np.int8)
    else:
        cls = np.full(d, -1, np.int8)
    ctx = neighbours(images[:, None], dz_mm) if dz_mm else None
    return SliceSet(images, lung, inf, cls, [group] * d, ctx)


def slices_from_volume(image: sitk.Image, label: sitk.Image | None, group: str, size: int = 256,
                       diagnosis: int | None = None, fov: str = "square") -> SliceSet:
    x, lab = model_slices(image, label, size, fov)  # transforms.pre_transforms, as at inference
    return slices_from_arrays(x, lab, group, diagnosis, dz_mm=slice_spacing(image))


def augmentations(style: bool = False) -> Compose:
    """Label-preserving augmentation (monai dictionary transforms); ``style`` adds the looks that tell
    picture sources apart -- gamma, contrast, blur, noise, lower resolution, JPEG re-compression -- so
    the network cannot learn a source from its look (issue 19)."""
    keys = ["image", "lung", "infection"]
    geometric = [
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandAffined(keys, prob=0.5, rotate_range=0.15, scale_range=0.1, translate_range=8,
                    mode=["bilinear", "nearest", "nearest"], padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.1, prob=0.3),
        RandGaussianNoised("image", prob=0.2, std=0.02),
    ]
    if not style:
        return Compose(geometric)
    return Compose(geometric + [
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        RandSimulateLowResolutiond("image", prob=0.2, zoom_range=(0.5, 0.9), upsample_mode="bilinear"),
        RandJpegd("image", prob=0.2, quality=(30, 90)),
    ])


class RandJpegd(RandomizableTransform, MapTransform):
    """JPEG re-compression of the [0, 1] image at a random quality (monai has no JPEG transform; the
    published picture collections differ in how hard they were compressed)."""

    def __init__(self, keys, prob: float = 0.2, quality=(30, 90)):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.quality = quality

    def __call__(self, data):
        from io import BytesIO

        from PIL import Image

        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        q = int(self.R.randint(self.quality[0], self.quality[1] + 1))
        for k in self.key_iterator(d):
            x = np.asarray(d[k], dtype=np.float32)
            out = []
            for c in x:  # each channel (the 2.5D input has three) compressed as its own grey picture
                buf = BytesIO()
                Image.fromarray(np.round(np.clip(c, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=q)
                out.append(np.asarray(Image.open(BytesIO(buf.getvalue())), dtype=np.float32) / 255.0)
            d[k] = torch.from_numpy(np.stack(out))
        return d


PICTURE_ROTATION = Compose([RandRotate90d(["image", "lung", "infection"], prob=0.75, max_k=3),
                            RandFlipd(["image", "lung", "infection"], prob=0.25, spatial_axis=0)])
KNOWN_ORIENTATION = ("phantom", "imlab", "wholescan")  # HU volumes keep their known orientation


class SliceDataset(Dataset):
    """Model-space slices as training samples. ``rotate_pictures``: 2D pictures (every group family not in
    ``KNOWN_ORIENTATION``) are also turned by 90/180/270 degrees and flipped, as collections publish them."""

    def __init__(self, data: SliceSet, augment: bool = False, style: bool = False, rotate_pictures: bool = False,
                 seed: int | None = None, channels: int = 1, context_dropout: float = 0.0):
        self.data = data
        self.channels = channels  # 3: the 2.5D input (SliceSet.inputs); augmentation moves all channels alike
        # share of volume slices shown without their neighbours (as a picture): the context channels then stop
        # telling a volume (here: mostly infection-free whole scans) from a picture (the infection masks)
        self.context_dropout = float(context_dropout) if augment else 0.0
        self._rng = np.random.default_rng(seed)
        self.aug = augmentations(style) if augment else None
        self.rotate = copy.deepcopy(PICTURE_ROTATION) if augment and rotate_pictures else None
        if seed is not None:
            for t in (self.aug, self.rotate):
                if t is not None:
                    t.set_random_state(seed)

    def __len__(self):
        return len(self.data)

    def _input(self, i) -> np.ndarray:
        if self.channels == 3 and self.context_dropout and self._rng.random() < self.context_dropout:
            return with_context(self.data.inputs(i, 1), 3)[0]
        return self.data.inputs(i, self.channels)[0]

    def __getitem__(self, i):
        d = self.data
        lung, inf = d.lung[i], d.infection[i]
        has_lung, has_inf = bool(lung[0, 0] != MISSING), bool(inf[0, 0] != MISSING)
        s = {
            "image": torch.from_numpy(self._input(i)),
            "lung": torch.from_numpy((lung[None] == 1).astype(np.float32)),
            "infection": torch.from_numpy((inf[None] == 1).astype(np.float32)),
        }
        if self.rotate is not None and str(d.group[i]).split("_", 1)[0] not in KNOWN_ORIENTATION:
            s = self.rotate(s)
        if self.aug is not None:
            s = self.aug(s)
        if self.aug is not None or self.rotate is not None:
            s = {k: torch.as_tensor(np.ascontiguousarray(np.asarray(v)), dtype=torch.float32) for k, v in s.items()}
        s["cls"] = torch.tensor(max(int(d.cls[i]), 0))
        s["cls_mask"] = torch.tensor(int(d.cls[i]) >= 0)
        s["lung_mask"] = torch.tensor(has_lung)
        s["infection_mask"] = torch.tensor(has_inf)
        return s


def epoch_indices(data: SliceSet, negative_fraction: float, rng: np.random.Generator,
                  errors: np.ndarray | None = None, hard: float = 0.0) -> np.ndarray:
    """All slices with something positive to learn + a fresh random share of the negatives (seed 002: 20 %).
    Hard negatives (issue 18, point 4): with ``hard`` > 0 and ``errors`` (per slice, NaN where not yet
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
    seg_loss: str = "focal"
    infection_loss: str | None = "dice_focal"
    lambdas: dict = field(default_factory=lambda: {"cls": 1.0, "lung": 1.0, "infection": 2.0})
    adaptive_cls: bool = False
    max_iters_per_epoch: int | None = None  # None or 0: the whole epoch sample
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    val_batch_size: int | None = None  # None: batch_size
    spike_rate_weight: float = 0.0  # > 0: add weight x mean firing rate of the spiking layers (sparse spikes)
    context_dropout: float = 0.0  # 2.5D input: share of training slices shown without neighbours (SliceDataset)
    hard_negatives: float = 0.0  # share of each epoch's negatives that are the model's worst (epoch_indices)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


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
        b = _to(batch, device)
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
    for name in ("lung", "infection"):
        if seg.get(name, {}).get("n_cases"):
            parts.append(seg[name]["dice"])
    if cls:
        auc = cls.get("auc", float("nan"))
        parts.append(auc if not math.isnan(auc) else cls["accuracy"])
    parts = [p for p in parts if not math.isnan(p)]
    return float(np.mean(parts)) if parts else 0.0


def fit(model: HybridMultiTaskNet, train: SliceSet, val: SliceSet | None, cfg: TrainConfig,
        on_epoch=None, stop=None, progress: bool = True) -> list:
    """Train ``model`` in place with the one loop (``hybrid_ct.trainer.Trainer``); ``on_epoch(epoch, stats,
    model)`` is called after each epoch (e.g. to keep the best checkpoint); ``stop()`` returning True ends
    training early. Returns the history (one dict per epoch: epoch, loss, train_slices, seconds, val)."""
    from .trainer import Trainer

    return Trainer(model, cfg, train, val, on_epoch=on_epoch, stop=stop, progress=progress).fit()


def split_by_group(groups, val_fraction: float = 0.2, seed: int = 0):
    """Deterministic train/val split by group id (patient / study): no group is on both sides."""
    import hashlib

    uniq = sorted(set(groups))
    def h(g):
        return int(hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    val_groups = {g for g in uniq if h(g) < val_fraction}
    if not val_groups and len(uniq) > 1:
        val_groups = {min(uniq, key=h)}
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    val = [i for i, g in enumerate(groups) if g in val_groups]
    return train, val
