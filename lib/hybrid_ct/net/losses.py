"""Losses: seed 002's multi-loss (MSE on CLS firing rates + focal per segmentation head, lambda-weighted),
Dice/focal combinations from monai, optional deep supervision, and seed 001's self-adaptive class loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceFocalLoss, DiceLoss, FocalLoss

SEG_LOSSES = ("focal", "dice", "dice_focal", "dice_ce")


def seg_loss(kind: str = "focal", alpha: float | None = 0.75, gamma: float = 2.0, dice_weight: float = 1.0) -> nn.Module:
    """A binary segmentation loss on sigmoid logits [B,1,H,W] vs {0,1} targets of the same shape."""
    if kind == "focal":
        return FocalLoss(gamma=gamma, alpha=alpha)
    if kind == "dice":
        return DiceLoss(sigmoid=True, batch=True)
    if kind == "dice_focal":
        return DiceFocalLoss(sigmoid=True, batch=True, gamma=gamma, alpha=alpha, lambda_dice=dice_weight)
    if kind == "dice_ce":  # seed 003: CE + 0.5 Dice; binary, so CE is BCE on the logits
        return _DiceBCE(dice_weight)
    raise ValueError(f"seg loss must be one of {SEG_LOSSES}, got {kind!r}")


class _DiceBCE(nn.Module):
    def __init__(self, dice_weight: float = 0.5):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.dice_weight = dice_weight

    def forward(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits, target) + self.dice_weight * self.dice(logits, target)


class SelfAdaptiveClassLoss(nn.Module):
    """Seed 001's self-adaptive auxiliary loss for the classifier.

    Cross-entropy weighted per class by the inverse effective number of samples (1 - a) / (1 - a^n_c),
    plus beta x reverse cross-entropy (robust to noisy labels); a = sigmoid(.) and beta = sigmoid(.) are
    learned. Class counts n_c are accumulated from the labels seen (or given).
    """

    def __init__(self, n_classes: int = 2, class_counts=None, alpha_init: float = 0.999, beta_init: float = 0.1):
        super().__init__()
        self.alpha_logit = nn.Parameter(torch.logit(torch.tensor(alpha_init)))
        self.beta_logit = nn.Parameter(torch.logit(torch.tensor(beta_init)))
        counts = torch.zeros(n_classes) if class_counts is None else torch.as_tensor(class_counts, dtype=torch.float32)
        self.register_buffer("counts", counts.float())
        self.fixed_counts = class_counts is not None

    def class_weights(self) -> torch.Tensor:
        a = torch.sigmoid(self.alpha_logit)
        n = self.counts.clamp(min=1.0)
        w = (1 - a) / (1 - a**n)
        return w / w.sum() * len(w)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.training and not self.fixed_counts:
            self.counts += torch.bincount(target, minlength=len(self.counts)).float()
        w = self.class_weights()[target]  # weighted CE by hand: F.cross_entropy takes no learnable weight
        nll = -torch.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
        ce = (w * nll).sum() / w.sum()
        prob = torch.softmax(logits, dim=1)
        one_hot = F.one_hot(target, logits.shape[1]).float()
        rce = -(prob * torch.log(one_hot.clamp(min=1e-4))).sum(1).mean()
        return ce + torch.sigmoid(self.beta_logit) * rce


class MultiTaskLoss(nn.Module):
    """mL = sum_i lambda_i L_i over the heads present in the network output.

    CLS: MSE between output firing rates and the one-hot label (seed 002), plus ``cls_ce`` x CE on the
    output current (keeps the probability calibrated), or the self-adaptive loss of seed 001.
    Segmentation: one binary loss per head; with deep supervision the auxiliary outputs are compared
    with max-pooled targets at their own scale, weighted 0.5, 0.25, ...
    Targets: ``cls`` [B] long, ``lung`` and ``infection`` [B,1,H,W] float {0,1}; a head whose target is
    missing is skipped, and ``cls_mask`` [B] bool can mark samples without a class label.
    """

    def __init__(self, lambdas: dict | None = None, seg: str = "focal", infection_seg: str | None = None,
                 cls_ce: float = 0.1, adaptive_cls: bool = False):
        super().__init__()
        self.lambdas = {"cls": 1.0, "lung": 1.0, "infection": 1.0, **(lambdas or {})}
        if any(v <= 0 for v in self.lambdas.values()):
            raise ValueError("every lambda must be > 0")
        self.seg = nn.ModuleDict({"lung": seg_loss(seg), "infection": seg_loss(infection_seg or seg)})
        self.cls_ce = cls_ce
        self.adaptive = SelfAdaptiveClassLoss() if adaptive_cls else None

    def cls_loss(self, out: dict, target: torch.Tensor) -> torch.Tensor:
        rates, logits = out["cls_rates"], out["cls_logits"]
        loss = F.mse_loss(rates, F.one_hot(target, rates.shape[1]).float())
        if self.adaptive is not None:
            return loss + self.adaptive(logits, target)
        if self.cls_ce:
            loss = loss + self.cls_ce * F.cross_entropy(logits, target)
        return loss

    def forward(self, out: dict, targets: dict):
        parts = {}
        if "cls_rates" in out and targets.get("cls") is not None:
            mask = targets.get("cls_mask")
            if mask is None or bool(mask.all()):
                parts["cls"] = self.cls_loss(out, targets["cls"])
            elif bool(mask.any()):
                sub = {k: out[k][mask] for k in ("cls_rates", "cls_logits")}
                parts["cls"] = self.cls_loss(sub, targets["cls"][mask])
        for head in ("lung", "infection"):
            if head not in out or targets.get(head) is None:
                continue
            y = targets[head].float()
            sel = targets.get(f"{head}_mask")
            pred = out[head]
            aux = out.get(f"{head}_aux", [])
            if sel is not None:
                if not bool(sel.any()):
                    continue
                pred, y, aux = pred[sel], y[sel], [a[sel] for a in aux]
            loss = self.seg[head](pred, y)
            for i, a in enumerate(aux):
                ya = F.adaptive_max_pool2d(y, a.shape[-2:])
                loss = loss + 0.5 ** (i + 1) * self.seg[head](a, ya)
            parts[head] = loss
        if not parts:
            raise ValueError("no head had a target: nothing to learn from this batch")
        total = sum(self.lambdas[k] * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}
