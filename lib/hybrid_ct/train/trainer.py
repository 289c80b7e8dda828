"""The one training loop of the project: ``Trainer`` (``hybrid_ct.train.scoring.fit`` for the CLI, the MONAI
Label app's ``HybridCTTrain``, and ``torchrun -m hybrid_ct.train.distributed``).

Every epoch draws its sample with ``epoch_indices`` (all slices with something positive + a fresh share
of the negatives) from one generator seeded with ``TrainConfig.seed``, so every rank of a distributed run
draws the same sample; rank ``r`` of ``W`` trains on ``idx[r::W]`` (``DistributedSampler``'s split, cut to
equal shards), ``batch_size`` slices per step and rank. The loss is ``MultiTaskLoss`` built from the
config, the optimiser AdamW with a cosine schedule over the epochs. Each epoch rank 0 validates with
``evaluate``, tracks the best epoch and calls ``on_epoch`` (checkpoints, train_stats); a ``stop()``
callback ends the run at the next iteration (all-reduced: every rank stops at the same step).

Distributed runs (the process group already initialised, world size > 1) wrap the network in
``DistributedDataParallel`` and compute BatchNorm statistics over the global batch, so W processes with
``batch_size`` b train like one process with b x W (``tests/test_distributed_training.py``).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hybrid_ct.contract import TRAINED_HEADS
from hybrid_ct.errors import InputError
from hybrid_ct.net.losses import MultiTaskLoss
from hybrid_ct.train.augment import SliceDataset
from hybrid_ct.data.slice_store import SliceSet
from hybrid_ct.train.config import TrainConfig, to_device, epoch_indices
from hybrid_ct.train.scoring import evaluate
from hybrid_ct.net.network import HybridMultiTaskNet, batchnorms

log = logging.getLogger(__name__)
LOSS_KEYS = (*TRAINED_HEADS, "spike_rate", "total")


# ----------------------------------------------------------------------------------------------------
# process group and BatchNorm over the global batch

def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None, init_method: str = "env://", rank: int | None = None,
                     world_size: int | None = None, device: str | torch.device | None = None) -> torch.device:
    """Join the process group (torchrun's environment by default; nccl with CUDA, else gloo) and return
    this process's device (``device``, else ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU)."""
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", rank or 0))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), init_method=init_method,
                            world_size=-1 if world_size is None else world_size, rank=-1 if rank is None else rank)
    return device


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with its gradient (the sum of the ranks' gradients)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch for CPU (gloo) runs: torch 2.14.1's
    ``nn.SyncBatchNorm`` refuses CPU tensors ("ValueError: SyncBatchNorm expected input tensor to be on
    GPU or XPU or privateuseone"). Same arithmetic as ``F.batch_norm`` in training (two-pass mean and
    biased variance to normalise, unbiased variance into the running statistics), over all ranks."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = _AllReduceSum.apply(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device))
        mean = _AllReduceSum.apply(x.sum(dims)) / n
        xc = x - mean.view(shape)
        var = _AllReduceSum.apply((xc * xc).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (n / (n - 1).clamp(min=1)), alpha=f)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def _global_bn(bn: nn.modules.batchnorm._BatchNorm, device: torch.device) -> nn.Module:
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(bn)
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.weight, new.bias = bn.weight, bn.bias  # the same Parameters (an optimiser over them stays valid)
    new.load_state_dict(bn.state_dict())
    return new.train(bn.training)


def sync_batchnorm(model: nn.Module, device: torch.device) -> list:
    """Replace every BatchNorm of ``model`` by one over the global batch (``nn.SyncBatchNorm`` on GPUs,
    ``GlobalBatchNorm`` on the CPU); returns what ``restore_batchnorm`` needs to put them back."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                    child, (nn.SyncBatchNorm, GlobalBatchNorm)):
                setattr(parent, name, _global_bn(child, device))
                swapped.append((parent, name, child))
    return swapped


def restore_batchnorm(swapped: list) -> None:
    for parent, name, original in reversed(swapped):
        original.load_state_dict(getattr(parent, name).state_dict())
        setattr(parent, name, original.train(getattr(parent, name).training))


# ----------------------------------------------------------------------------------------------------
# the loop

def build_loss(cfg: TrainConfig) -> MultiTaskLoss:
    return MultiTaskLoss(cfg.lambdas, seg=cfg.seg_loss, infection_seg=cfg.infection_loss, adaptive_cls=cfg.adaptive_cls)


def build_optimizer(model: nn.Module, loss_fn: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


@torch.no_grad()
def negative_errors(out: dict, batch: dict) -> torch.Tensor:
    """How wrong the model is on each sample if it is a negative: its probability of the positive class
    plus 20 x the share of the slice it calls infection (>= 0.5) where the infection target is known
    (a 5 % false outline weighs like a wrong class call) -> [B] float (hard negatives)."""
    err = torch.zeros(len(batch["image"]), device=batch["image"].device)
    if "cls_logits" in out:
        err += torch.softmax(out["cls_logits"].detach().float(), 1)[:, 1]
    if "infection" in out:
        false = ((out["infection"].detach() >= 0) & (batch["infection"] < 0.5)).flatten(1).float().mean(1)
        err += 20.0 * false * batch["infection_mask"].float()
    return err


def spiking_neurons(model: nn.Module) -> list:
    """The neurons that emit spikes (membrane read-outs excluded): what the firing-rate regulariser counts."""
    from spikingjelly.activation_based import neuron

    return [m for m in model.modules() if isinstance(m, neuron.BaseNode)
            and not isinstance(m, getattr(neuron, "NonSpikingLIFNode", ()))]


class Trainer:
    """``Trainer(model, cfg, train, val).fit() -> history`` (one dict per epoch: ``epoch``, ``loss``
    (mean per batch: ``cls`` / ``lung`` / ``infection`` / ``total``, over all ranks), ``train_slices``
    (all ranks), ``seconds`` (training), ``val`` (``evaluate``; rank 0, when ``val`` has slices)).

    ``model`` is trained in place on ``cfg.device``; ``loss_fn`` / ``optimizer`` default to
    ``build_loss`` / ``build_optimizer`` of ``cfg``. ``on_epoch(epoch, stats, model)`` runs on rank 0
    after each epoch; ``stop()`` returning True on any rank ends the run at the next iteration. After
    ``fit``: ``best_score`` / ``best_epoch`` / ``best_state`` (rank 0), ``stopped``, ``history``.
    With a process group of world size > 1 the run is distributed (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train: SliceSet, val: SliceSet | None = None, *,
                 loss_fn: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 on_epoch=None, stop=None, progress: bool = False, spent=None):
        self.rank, self.world = rank_and_world()
        self.lead = self.rank == 0
        torch.manual_seed(cfg.seed + self.rank)
        self.rng = np.random.default_rng(cfg.seed)  # the same epoch sampling on every rank
        self.cfg, self.train_set, self.val_set = cfg, train, val
        self.device = torch.device(cfg.device)
        self.model = model.to(self.device)
        self.loss_fn = (loss_fn or build_loss(cfg)).to(self.device)
        self.opt = optimizer or build_optimizer(self.model, self.loss_fn, cfg)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(cfg.epochs, 1))
        # ``spent()``: the share of a wall-clock budget used (0..1). Then the cosine follows whichever is further,
        # the epochs or the clock, step by step: a run the budget stops in its second of ten epochs would
        # otherwise publish weights taken at nearly the peak rate (the app's retrains of the shipped network)
        self.spent = spent
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.epoch = 0
        self.on_epoch, self._stop, self.progress = on_epoch, stop, progress and self.lead
        self.stopped = False
        self.history: list = []
        self.best_score, self.best_epoch, self.best_state = -1.0, None, None
        self._rates: list = []
        self._collect = False  # rates are kept only inside a training step (validation would hold every graph)
        self._hooks = []
        # hard negatives: each slice's error when last trained on (NaN: not yet), read by epoch_indices
        self.errors = np.full(len(train), np.nan) if cfg.hard_negatives > 0 else None
        if cfg.spike_rate_weight > 0:
            for m in spiking_neurons(self.model):
                self._hooks.append(m.register_forward_hook(self._record_rate))

    def _record_rate(self, _m, _i, out):
        if self._collect:
            self._rates.append(out.float().mean())

    # -- pieces
    def should_stop(self) -> bool:
        if self.stopped:
            return True
        flag = bool(self._stop()) if self._stop is not None else False
        if self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        self.stopped = flag
        return flag

    def epoch_shard(self) -> np.ndarray:
        """This rank's slices of the next epoch: never a batch of one (BatchNorm needs two samples)."""
        if self.errors is not None and self.world > 1:  # every rank draws the same epoch from all ranks' errors
            t = torch.from_numpy(np.nan_to_num(self.errors, nan=-1.0)).to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self.errors = t.cpu().numpy()
            self.errors[self.errors < 0] = np.nan
        idx = epoch_indices(self.train_set, self.cfg.negative_fraction, self.rng, self.errors, self.cfg.hard_negatives)
        if self.world > 1:
            idx = idx[self.rank::self.world][: len(idx) // self.world]
        if len(idx) < 1:
            raise InputError("no training slice this epoch: add labelled data")
        bs = self.cfg.batch_size
        if len(idx) == 1:
            idx = np.concatenate([idx, idx])
        elif bs > 1 and len(idx) % bs == 1:
            idx = idx[:-1]  # idx is shuffled: a random slice sits out this epoch
        return idx

    def train_epoch(self, net: nn.Module, loader, idx: np.ndarray | None = None) -> dict:
        """One pass over ``loader`` (at most ``max_iters_per_epoch`` steps) -> mean losses per batch.
        ``idx``: the training-set index of each sample in loader order (records hard-negative errors)."""
        net.train()
        if self.cfg.freeze_bn:
            for m in batchnorms(self.model):
                m.eval()
        sums, n = dict.fromkeys(LOSS_KEYS, 0.0), 0
        seen = dict.fromkeys(LOSS_KEYS, 0)
        max_iters = self.cfg.max_iters_per_epoch
        for it, batch in enumerate(tqdm(loader, desc="train", unit="batch", disable=not self.progress, leave=False)):
            if (max_iters and it >= max_iters) or self.should_stop():
                break
            if self.spent is not None:
                self._set_lr(it / max(min(len(loader), max_iters or len(loader)), 1))
            b = to_device(batch, self.device)
            self._rates.clear()
            self._collect = True
            try:
                out = net(b["image"])
                loss, parts = self.loss_fn(out, b)
            finally:
                self._collect = False
            if self.errors is not None and idx is not None:
                at = idx[it * loader.batch_size: it * loader.batch_size + len(b["image"])]
                self.errors[at] = negative_errors(out, b).cpu().numpy()
            if self._rates:  # the firing-rate regulariser: fewer spikes, less energy (seed 002's E_hybrid)
                rate = torch.stack(self._rates).mean()
                loss = loss + self.cfg.spike_rate_weight * rate
                parts["spike_rate"] = float(rate.detach())
                self._rates.clear()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self._sync_loss_grads()
            self.opt.step()
            parts["total"] = float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
                seen[k] += 1
            n += 1
        vec = [sums[k] for k in LOSS_KEYS] + [seen[k] for k in LOSS_KEYS] + [n]
        if self.world > 1:
            t = torch.tensor(vec, dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            vec = t.tolist()
        k_n = len(LOSS_KEYS)
        return {k: vec[i] / max(vec[-1], 1) for i, k in enumerate(LOSS_KEYS) if vec[k_n + i] > 0}

    def _set_lr(self, within: float) -> None:
        """Cosine over the larger of the epochs' progress and the clock's (``spent``); all ranks agree."""
        done = ((self.epoch - 1) + within) / max(self.cfg.epochs, 1)
        t = float(self.spent())
        if self.world > 1:
            v = torch.tensor([t], dtype=torch.float64, device=self.device)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
            t = float(v.item())
        f = min(max(done, t, 0.0), 1.0)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * 0.5 * (1.0 + math.cos(math.pi * f))

    def _sync_loss_grads(self):
        """Learnable loss parameters (the adaptive class loss) are outside DDP: average their gradients
        (a rank without a class target this step contributes zero)."""
        if self.world == 1:
            return
        for p in self.loss_fn.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world

    def validate(self, epoch: int, stats: dict) -> None:
        if self.val_set is None or not len(self.val_set):
            return
        stats["val"] = evaluate(self.model, self.val_set, self.cfg.val_batch_size or self.cfg.batch_size, self.device)
        score = float(stats["val"]["score"])
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def replica_divergence(self) -> float:
        """Largest absolute difference between this rank's weights and buffers and rank 0's, over all
        ranks (0.0 when they are in sync, or in one process). Every rank must call it."""
        if self.world == 1:
            return 0.0
        flat = torch.cat([v.detach().double().flatten() for v in self.model.state_dict().values()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        d = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        return float(d.item())

    # -- the run
    def fit(self) -> list:
        cfg = self.cfg
        net, swapped = self.model, []
        if self.world > 1:
            swapped = sync_batchnorm(self.model, self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: a head without a target in a batch gets no gradient
            net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        try:
            for epoch in range(1, cfg.epochs + 1):
                if self.should_stop():
                    break
                t0 = time.perf_counter()
                self.epoch = epoch
                idx = self.epoch_shard()
                loader = DataLoader(SliceDataset(self.train_set.subset(idx), augment=cfg.augment, style=cfg.style_augment,
                                                 rotate_pictures=cfg.rotate_pictures, seed=cfg.seed * 1000 + epoch,
                                                 channels=self.model.cfg.in_channels,
                                                 context_dropout=cfg.context_dropout,
                                                 synth_lesions=cfg.synth_lesions, protocol_aug=cfg.protocol_aug),
                                    batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
                losses = self.train_epoch(net, loader, idx)
                if self.spent is None:
                    self.sched.step()
                stats = {"epoch": epoch, "loss": losses, "train_slices": int(len(idx)) * self.world,
                         "seconds": time.perf_counter() - t0}
                if self.lead:
                    self.validate(epoch, stats)
                    self.history.append(stats)
                    log.info("epoch %d loss %.4f score %s", epoch, losses.get("total", float("nan")),
                             stats.get("val", {}).get("score"))
                    if self.on_epoch is not None:
                        self.on_epoch(epoch, stats, self.model)
                if self.world > 1:
                    dist.barrier()
        finally:
            restore_batchnorm(swapped)
            for h in self._hooks:  # the model leaves the trainer without the regulariser's hooks
                h.remove()
        return self.history

    def best_model(self) -> nn.Module | None:
        """A CPU copy of the model with the best epoch's weights (rank 0; None before a validated epoch)."""
        if self.best_state is None:
            return None
        model = copy.deepcopy(self.model).cpu()
        model.load_state_dict(self.best_state)
        return model


def fit(model: HybridMultiTaskNet, train: SliceSet, val: SliceSet | None, cfg: TrainConfig,
        on_epoch=None, stop=None, progress: bool = True) -> list:
    """Train ``model`` in place with the one loop (``hybrid_ct.train.trainer.Trainer``); ``on_epoch(epoch, stats,
    model)`` is called after each epoch (e.g. to keep the best checkpoint); ``stop()`` returning True ends
    training early. Returns the history (one dict per epoch: epoch, loss, train_slices, seconds, val)."""

    return Trainer(model, cfg, train, val, on_epoch=on_epoch, stop=stop, progress=progress).fit()
