"""The slice store: model-space slices with whatever targets each has (lung, infection, class), grouped by
patient, plus the replay sample kept beside a checkpoint. Every data source ends here, and the trainer,
the evaluation and the app's retraining read it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hybrid_ct.contract import head_targets
from hybrid_ct.processing.context import neighbours, stack
from hybrid_ct.processing.grid import slice_spacing
from hybrid_ct.processing.transforms import model_slices
from hybrid_ct.processing.context import with_context


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
        input of ``hybrid_ct.processing.context``) the slice below, the slice, the slice above."""
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
    """x [D,1,S,S] in [0,1]; label [D,S,S] with the contract's values or None: each segmentation head's target
    is the union of the labels it declares (contract.json "heads"; both lung sides and unsided lung train the
    lung head). The slice class is "infection present"
    when the infection mask is known, else the scan's diagnosis if it is negative (all slices negative);
    slices of a positive scan without an infection mask have no class target. ``dz_mm``: x is a volume
    with this slice spacing, and each slice keeps its neighbours (``hybrid_ct.processing.context``)."""
    d, s = x.shape[0], x.shape[-1]
    images = np.round(np.clip(x[:, 0], 0, 1) * 255).astype(np.uint8)
    miss = np.full((d, s, s), MISSING, np.uint8)
    targets = head_targets(label) if label is not None else {}
    lung = targets["lung"].astype(np.uint8) if label is not None and lung_known else miss
    inf = targets["infection"].astype(np.uint8) if label is not None and infection_known else miss.copy()
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


@dataclass
class SourceSet:
    """One data source in model space."""

    name: str
    slices: SliceSet
    weak_lung: bool = False  # lung masks are weak labels (made by ``weak_lung_mask``)
    files: list = field(default_factory=list)  # input file per slice (provenance)

    def __len__(self):
        return len(self.slices)

    def summary(self) -> dict:
        s = self.slices
        has = lambda m: int(sum(1 for a in m if a[0, 0] != MISSING))  # noqa: E731
        return {"slices": len(s), "groups": len(set(s.group)), "lung_masks": has(s.lung),
                "infection_masks": has(s.infection), "positive": int((s.cls == 1).sum()),
                "negative": int((s.cls == 0).sum()), "weak_lung": self.weak_lung}


def stack_sets(parts: list, size: int) -> SliceSet:
    out = SliceSet.empty(size)
    if not parts:
        return out
    ctx = np.concatenate([p.neighbours() for p in parts]) if any(p.context is not None for p in parts) else None
    return SliceSet(np.concatenate([p.images for p in parts]), np.concatenate([p.lung for p in parts]),
                    np.concatenate([p.infection for p in parts]), np.concatenate([p.cls for p in parts]),
                    [g for p in parts for g in p.group], ctx)
