"""Losses: seed 002's multi-loss (MSE on CLS firing rates + focal per segmentation head, lambda-weighted),
Dice/focal combinations from monai, optional deep supervision, and seed 001's self-adaptive class loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceFocalLoss, DiceLoss, FocalLoss

from hybrid_ct.contract import HEADS

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

    The heads, their losses and default lambdas are contract.json's "heads" (``heads``: another table of the
    same form, e.g. a test's). CLS: MSE between output firing rates and the one-hot label (seed 002), plus
    ``cls_ce`` x CE on the output current (keeps the probability calibrated), or the self-adaptive loss of
    seed 001. Segmentation: one binary loss per segmentation head; with deep supervision the auxiliary
    outputs are compared with max-pooled targets at their own scale, weighted 0.5, 0.25, ...
    Targets: ``cls`` [B] long, one [B,1,H,W] float {0,1} per segmentation head (``lung``, ``infection``);
    a head whose target is missing is skipped, and ``<head>_mask`` [B] bool marks samples without one.
    ``seg`` / ``infection_seg`` override the declared losses (the lung and infection heads' names kept for
    the recipes); ``losses`` overrides any head's by name.
    """

    def __init__(self, lambdas: dict | None = None, seg: str | None = None, infection_seg: str | None = None,
                 cls_ce: float = 0.1, adaptive_cls: bool = False, losses: dict | None = None,
                 heads: dict | None = None):
        super().__init__()
        heads = HEADS if heads is None else heads
        trained = [n for n, h in heads.items() if h["kind"] != "derived"]
        self.seg_heads = [n for n in trained if heads[n]["kind"] == "segmentation"]
        self.lambdas = {**{n: float(heads[n]["lambda"]) for n in trained}, **(lambdas or {})}
        if any(v <= 0 for v in self.lambdas.values()):
            raise ValueError("every lambda must be > 0")
        kinds = {n: heads[n]["loss"] for n in self.seg_heads}
        if seg:
            kinds = {n: seg for n in kinds}
        if infection_seg and "infection" in kinds:
            kinds["infection"] = infection_seg
        kinds.update(losses or {})
        self.seg = nn.ModuleDict({n: seg_loss(k) for n, k in kinds.items()})
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
        for head in self.seg_heads:
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
