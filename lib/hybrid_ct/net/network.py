"""The hybrid spike-conv multi-task network of seed 002 and its CNN twin.

A hybrid layer is conv -> BN -> LIF (spikingjelly, multi-step mode); the neuron is the activation.
Tensors inside the network are ``[T, B, C, H, W]``. The first layer sees the same (normalised CT)
input at every time step, so it is computed once and broadcast over T ("static" input); every later
layer sees spike trains. The encoder's last layer is a non-spiking LIF whose membrane potential,
averaged over T, is the joint feature F shared by all heads. The CNN twin is the same topology with
ReLU and T = 1 (the E_conv reference and the baseline of every comparison).

From spikingjelly (``activation_based``): the neurons (``neuron.LIFNode`` / ``ParametricLIFNode`` in
multi-step mode, ``NonSpikingLIFNode`` with ``decode="mean-mem"``), the surrogate gradients, state
reset (``functional.reset_net``), every stateless layer applied to all T steps at once
(``functional.seq_to_ann_forward`` around the plain torch conv / BN / linear modules, so the
state_dict keys stay those of the shipped checkpoint; ``layer.MaxPool2d(step_mode="m")``), and
per-layer gradient checkpointing with bool spike compression (``memopt``). Own code: the static-input
broadcast over T, the fused inference LIF (measurably faster on CPU, see ``LIF``) and BN folding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.memopt import BooleanSpikeCompressor
from spikingjelly.activation_based.memopt import checkpoint as sj_checkpoint

from hybrid_ct.contract import HEADS as HEAD_SPECS, TRAINED_HEADS

HEADS = TRAINED_HEADS  # declared in contract.json "heads": a classifier and one decoder per segmentation head
SURROGATES = {"atan": surrogate.ATan, "sigmoid": surrogate.Sigmoid, "erf": surrogate.Erf}


@dataclass
class NetConfig:
    levels: int = 5  # N1: encoder levels (the last without pooling)
    base_channels: int = 16  # channels of level 0; doubled per level up to max_channels
    max_channels: int = 256
    fc_layers: int = 2  # N2: spiking fully-connected layers of the CLS head (the last has 2 neurons)
    fc_hidden: int = 128
    cls_pool: int = 4  # F is average-pooled to cls_pool x cls_pool before flattening
    time_steps: int = 4  # T
    spiking: bool = True  # False: the CNN twin (ReLU, T = 1)
    neuron: str = "lif"  # "lif" | "plif" (parametric LIF, learned tau)
    tau: float = 2.0
    v_threshold: float = 1.0
    surrogate: str = "atan"
    up_kernel: int = 3  # transposed-conv kernel (3 or 5)
    skip: bool = True  # U-Net style skip connections from the encoder
    deep_supervision: bool = False  # auxiliary 1x1 outputs at every decoder scale (seeds 001/003)
    heads: tuple = HEADS
    reuse_static: bool = True  # compute static-input layers once, not T times (same output)
    grad_checkpoint: bool = False  # recompute each layer in backward from its input kept as bool spikes
    in_size: int = 256
    in_channels: int = 1  # 3: the 2.5D input, the slice and its neighbours context_mm below / above (context.py)
    context_mm: float = 5.0
    fov: str = "square"  # "lungs": the input is the box around the lungs, made square (processing.grid.FOVS)
    # What the network sees, stored in every checkpoint (a checkpoint without them was built with these values):
    window_hu: tuple = (-1350.0, 150.0)  # HU mapped onto [0, 1] (the lung window W1500 / L-600), clipped
    lung_margin_mm: float = 20.0  # fov "lungs": margin around the lungs' air before the box is made square
    body_hu: float = -500.0  # the body is the largest region above it; air below it sets the lung slab and box

    def __post_init__(self):
        self.heads = tuple(self.heads)
        unknown = set(self.heads) - set(HEADS)
        if unknown or not self.heads:
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {self.heads}")
        if not self.spiking:
            self.time_steps = 1
        if self.time_steps < 1 or self.levels < 1 or self.fc_layers < 1:
            raise ValueError("time_steps, levels and fc_layers must be >= 1")
        if float(self.tau) <= 1.0:
            raise ValueError(f"tau must be > 1, got {self.tau}")
        self.tau = float(self.tau)
        if self.neuron not in ("lif", "plif"):
            raise ValueError(f"neuron must be 'lif' or 'plif', got {self.neuron!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {sorted(SURROGATES)}, got {self.surrogate!r}")
        if self.fov not in ("square", "lungs"):
            raise ValueError(f"fov must be 'square' or 'lungs', got {self.fov!r}")
        self.window_hu = tuple(float(v) for v in self.window_hu)
        if len(self.window_hu) != 2 or not self.window_hu[0] < self.window_hu[1]:
            raise ValueError(f"window_hu must be (low, high) with low < high, got {self.window_hu}")
        if float(self.lung_margin_mm) < 0:
            raise ValueError(f"lung_margin_mm must be >= 0, got {self.lung_margin_mm}")
        self.lung_margin_mm, self.body_hu = float(self.lung_margin_mm), float(self.body_hu)
        if self.up_kernel not in (3, 5):
            raise ValueError("up_kernel must be 3 or 5")
        if self.in_channels not in (1, 3) or float(self.context_mm) <= 0:
            raise ValueError(f"in_channels must be 1 or 3 and context_mm > 0, got {self.in_channels}, {self.context_mm}")

    def channels(self, level: int) -> int:
        return min(self.base_channels * 2**level, self.max_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["heads"] = list(self.heads)
        d["window_hu"] = list(self.window_hu)
        return d

    def input_spec(self) -> dict:
        """The keyword arguments of ``processing.transforms.pre_transforms`` that define this network's input."""
        return {"fov": self.fov, "window_hu": tuple(self.window_hu), "margin_mm": self.lung_margin_mm,
                "body_hu": self.body_hu}

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def cnn_twin(cfg: NetConfig) -> NetConfig:
    """The same topology with ReLU and T = 1."""
    return replace(cfg, spiking=False, time_steps=1)


def _activation(cfg: NetConfig) -> nn.Module:
    if not cfg.spiking:
        return nn.ReLU()
    kw = dict(v_threshold=cfg.v_threshold, v_reset=0.0, detach_reset=True, step_mode="m",
              surrogate_function=SURROGATES[cfg.surrogate]())
    if cfg.neuron == "plif":
        return neuron.ParametricLIFNode(init_tau=cfg.tau, **kw)
    return LIF(tau=cfg.tau, **kw)


def lif_inference(x_seq: torch.Tensor, tau: float, v_threshold: float) -> torch.Tensor:
    """LIF over T steps without autograd, in place: the same arithmetic as spikingjelly's LIFNode
    (decay_input=True, hard reset to 0) -- ``h = v + (x - v) / tau``, spike where ``h >= v_th``, then
    ``v = 0`` where it spiked -- with one buffer per step instead of ~6 temporaries (tested equal)."""
    out = torch.empty_like(x_seq)
    v = torch.zeros_like(x_seq[0])
    tmp = torch.empty_like(v)
    fired = torch.empty(v.shape, dtype=torch.bool, device=v.device)
    for t in range(x_seq.shape[0]):
        torch.sub(x_seq[t], v, out=tmp)
        v.add_(tmp.div_(tau))
        torch.ge(v, v_threshold, out=fired)
        out[t].copy_(fired)
        v.masked_fill_(fired, 0.0)
    return out


class LIF(neuron.LIFNode):
    """spikingjelly's LIFNode; at inference (eval, no autograd) it runs the fused ``lif_inference``.
    Being the same module call, forward hooks (the energy meter's spike counters) still see it."""

    # Fused vs spikingjelly 2.0's CPU LIF, 1 thread, median of 7: 2.0x / 3.1x faster per call ([4,8,8,128²] /
    # [4,8,16,256²]); whole seed network T=4: 1.5-2.3 vs 3.6-4.1 s/slice, 1.5 vs 2.5 GB (docs/benchmarks.md).

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs):
        if not self.training and not torch.is_grad_enabled():
            # the membrane in float32 even under fp16 autocast (CUDA): the threshold test is where
            # rounding changes the output; spikes are exact in any precision
            return lif_inference(x_seq.float(), self.tau, self.v_threshold)
        return super().multi_step_forward(x_seq.contiguous(), *args, **kwargs)


def reset_state(net: nn.Module) -> None:
    """``functional.reset_net(net)``. Under ``torch.compile`` the same resets without reset_net's module
    cache: that cache is a process-wide dict dynamo guards on, so the first call after compilation, and
    any other network reset anywhere in the process, would recompile the compiled one (issue 30)."""
    if torch.compiler.is_compiling():
        for m in net.modules():
            if callable(getattr(m, "reset", None)):
                m.reset()
        return
    functional.reset_net(net)


def _fire(act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Run a spiking activation over [T, ...] from a reset membrane."""
    reset_state(act)
    return act(y)


def _seq(x_seq: torch.Tensor, *stateless: nn.Module) -> torch.Tensor:
    """Stateless modules on all T steps at once: [T, B, ...] -> [T*B, ...] -> modules -> [T, B, ...]."""
    return functional.seq_to_ann_forward(x_seq, stateless)


class HybridLayer(nn.Module):
    """conv (or transposed conv, or linear) -> BN -> LIF over T steps; ReLU in the CNN twin.

    ``forward`` takes ``[T, B, ...]``, or ``[B, ...]`` for a static input that is the same at every step:
    the synaptic part is then computed once and broadcast over T. Each call starts from a reset membrane.
    """

    def __init__(self, cin: int, cout: int, cfg: NetConfig, kind: str = "conv", norm: bool = True):
        super().__init__()
        self.time_steps = cfg.time_steps
        self.reuse_static = cfg.reuse_static
        self.grad_checkpoint = cfg.grad_checkpoint
        self.spiking = cfg.spiking
        if kind == "conv":
            self.syn = nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)
            bn = nn.BatchNorm2d
        elif kind == "up":
            k = cfg.up_kernel
            self.syn = nn.ConvTranspose2d(cin, cout, k, stride=2, padding=k // 2, output_padding=1, bias=not norm)
            bn = nn.BatchNorm2d
        elif kind == "fc":
            self.syn = nn.Linear(cin, cout, bias=not norm)
            bn = nn.BatchNorm1d
        else:
            raise ValueError(kind)
        self.norm = bn(cout) if norm else nn.Identity()
        self.act = _activation(cfg)

    def synapse(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.syn(x))

    def forward(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return _checkpointed(self, self._forward, x, static=static)
        return self._forward(x, static)

    def _forward(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        t = self.time_steps
        if static and self.reuse_static:
            y = self.synapse(x)
            y = y.unsqueeze(0).expand(t, *y.shape)
        else:
            if static:  # naive reference: the same input presented at each of the T steps
                x = x.unsqueeze(0).expand(t, *x.shape)
            y = _seq(x, self.syn, self.norm)
        if isinstance(self.act, nn.ReLU):
            return self.act(y)
        return _fire(self.act, y)


def batchnorms(module: nn.Module) -> list:
    """Every BatchNorm layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _RecomputeGuard:
    """Keeps BatchNorm running statistics from being updated a second time when a checkpointed layer
    is recomputed during the backward pass (momentum 0 leaves them unchanged)."""

    def __init__(self, module: nn.Module):
        self.bns = batchnorms(module)

    def __enter__(self):
        self.saved = [bn.momentum for bn in self.bns]
        for bn in self.bns:
            bn.momentum = 0.0

    def __exit__(self, *exc):
        for bn, m in zip(self.bns, self.saved):
            bn.momentum = m


def _checkpointed(layer: nn.Module, fn, x: torch.Tensor, static: bool = False) -> torch.Tensor:
    """Per-layer gradient checkpointing (spikingjelly memopt): only the layer input is kept, as bool
    when it is a spike tensor; conv, BN and LIF are recomputed in the backward pass."""
    state = {"first": True}

    def run(inp):
        if state["first"]:
            state["first"] = False
            return fn(inp, static)
        with _RecomputeGuard(layer):
            return fn(inp, static)

    compressor = BooleanSpikeCompressor() if layer.spiking and not static else None
    return sj_checkpoint(run, x, compressor=compressor)


class MembraneReadout(nn.Module):
    """conv -> BN -> non-spiking LIF; returns the membrane potential averaged over T (z = mean_t u(t))."""

    def __init__(self, cin: int, cout: int, cfg: NetConfig):
        super().__init__()
        self.time_steps = cfg.time_steps
        self.syn = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.integrate = neuron.NonSpikingLIFNode(tau=cfg.tau, decode="mean-mem") if cfg.spiking else None
        self.grad_checkpoint = cfg.grad_checkpoint
        self.spiking = cfg.spiking

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return _checkpointed(self, lambda inp, _static: self._forward(inp), x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _seq(x, self.syn, self.norm)
        if self.integrate is None:
            return y[0]
        z = self.integrate(y)
        self.integrate.v = None  # not a MemoryModule: drop its state so no graph outlives the call
        return z


class Encoder(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.pool = layer.MaxPool2d(2, step_mode="m")  # no parameters: the state_dict is unchanged
        self.levels = nn.ModuleList()
        cin = cfg.in_channels
        for lv in range(cfg.levels):
            ch = cfg.channels(lv)
            first = HybridLayer(cin, ch, cfg)
            second = MembraneReadout(ch, ch, cfg) if lv == cfg.levels - 1 else HybridLayer(ch, ch, cfg)
            self.levels.append(nn.ModuleList([first, second]))
            cin = ch

    def _level(self, lv: int, x: torch.Tensor) -> torch.Tensor:
        first, second = self.levels[lv]
        if lv > 0:
            x = self.pool(x)
        return second(first(x, static=lv == 0))

    def forward(self, x: torch.Tensor):
        """x [B,in_channels,H,W] -> (F [B,C,h,w], skips: spike trains [T,B,C,H,W] of every level but the last)."""
        skips = []
        h = x
        for lv in range(self.cfg.levels):
            h = self._level(lv, h)
            if lv < self.cfg.levels - 1:
                skips.append(h)
        return h, skips


class SegDecoder(nn.Module):
    """Mirror of the encoder: per level a spiking transposed conv (x2), skip concat, 2 hybrid layers;
    a 1x1 conv on the spikes, averaged over T, gives the logits."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.aux = nn.ModuleList()
        for lv in range(cfg.levels - 2, -1, -1):
            cin, ch = cfg.channels(lv + 1), cfg.channels(lv)
            self.ups.append(HybridLayer(cin, ch, cfg, kind="up"))
            cat = 2 * ch if cfg.skip else ch
            self.blocks.append(nn.ModuleList([HybridLayer(cat, ch, cfg), HybridLayer(ch, ch, cfg)]))
            if cfg.deep_supervision and lv > 0:
                self.aux.append(nn.Conv2d(ch, 1, 1))
        self.out = nn.Conv2d(cfg.channels(0), 1, 1)

    def _head(self, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        return _seq(h, conv).mean(0)

    def _level(self, i: int, h: torch.Tensor, skip, static: bool) -> torch.Tensor:
        h = self.ups[i](h, static=static)
        if self.cfg.skip:
            h = torch.cat([h, skip], dim=2)
        a, b = self.blocks[i]
        return b(a(h))

    def forward(self, feat: torch.Tensor, skips: list):
        aux = []
        h = feat
        for i in range(len(self.ups)):
            h = self._level(i, h, skips[-1 - i], static=i == 0)
            if i < len(self.aux):
                aux.append(self._head(self.aux[i], h))
        if not self.ups:  # a single-level network: F is already full resolution
            return self.out(feat), aux
        return self._head(self.out, h), aux


class ClsHead(nn.Module):
    """F -> avg-pool -> flatten -> N2 fully-connected hybrid layers; the last has 2 output neurons.

    Returns the output firing rates [B,2] (the class is the neuron that fires most) and the output
    layer's input current averaged over T [B,2] (a continuous score, used for the probability / ROC).
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.pool = nn.AdaptiveAvgPool2d(cfg.cls_pool)
        dims = [cfg.channels(cfg.levels - 1) * cfg.cls_pool**2] + [cfg.fc_hidden] * (cfg.fc_layers - 1) + [2]
        self.hidden = nn.ModuleList(HybridLayer(a, b, cfg, kind="fc") for a, b in zip(dims[:-2], dims[1:-1]))
        # The output layer is linear -> BN -> LIF too: without the normalisation the two output neurons
        # of a fresh network never fire (STACK.md), and MSE on all-zero rates gives no class signal.
        self.out = nn.Linear(dims[-2], 2, bias=False)
        self.out_norm = nn.BatchNorm1d(2)
        self.out_act = _activation(cfg) if cfg.spiking else None

    def forward(self, feat: torch.Tensor):
        t = self.cfg.time_steps
        h = self.pool(feat).flatten(1)
        static = True
        for layer in self.hidden:
            h = layer(h, static=static)
            static = False
        if static:  # N2 == 1: the output layer reads F directly
            h = h.unsqueeze(0).expand(t, *h.shape)
        current = _seq(h, self.out, self.out_norm)
        logits = current.mean(0)
        if self.out_act is None:
            return torch.softmax(logits, dim=1), logits
        rates = _fire(self.out_act, current).mean(0)
        return rates, logits


class HybridMultiTaskNet(nn.Module):
    """Shared encoder E + parallel heads (CLS, lung par-SEG, infection inf-SEG)."""

    def __init__(self, cfg: NetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or NetConfig()
        self.encoder = Encoder(cfg)
        self.cls = ClsHead(cfg) if "cls" in cfg.heads else None
        self.seg = nn.ModuleDict({h: SegDecoder(cfg) for h in cfg.heads if HEAD_SPECS[h]["kind"] == "segmentation"})

    def forward(self, x: torch.Tensor) -> dict:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected input [B, {self.cfg.in_channels}, H, W], got {tuple(x.shape)}")
        div = 2 ** (self.cfg.levels - 1)
        if x.shape[-1] % div or x.shape[-2] % div:
            raise ValueError(f"H and W must be multiples of {div} for {self.cfg.levels} levels, got {tuple(x.shape[-2:])}")
        reset_state(self)
        feat, skips = self.encoder(x)
        out = {}
        if self.cls is not None:
            out["cls_rates"], out["cls_logits"] = self.cls(feat)
        for name, dec in self.seg.items():
            out[name], aux = dec(feat, skips)
            if aux:
                out[f"{name}_aux"] = aux
        reset_state(self)  # drop membrane tensors so nothing leaks between calls
        return out

    @staticmethod
    def positive_probability(out: dict) -> torch.Tensor:
        """P(positive) from the CLS output's mean input current (softmax over the two neurons)."""
        return torch.softmax(out["cls_logits"], dim=1)[:, 1]

    @staticmethod
    def predicted_class(out: dict) -> torch.Tensor:
        """The neuron that fires most; ties (e.g. both silent) are broken by the input current."""
        rates, logits = out["cls_rates"], out["cls_logits"]
        return torch.argmax(rates + 1e-3 * torch.softmax(logits, dim=1), dim=1)


@torch.no_grad()
def fold_batchnorm(model: HybridMultiTaskNet) -> HybridMultiTaskNet:
    """Inference copy with every BatchNorm folded into the conv / linear before it (seed 003's
    re-parameterisation idea): same output up to float rounding, one pass less per layer."""
    import copy

    folded = copy.deepcopy(model).eval()
    pairs = [(m, "syn", "norm") for m in folded.modules() if isinstance(m, (HybridLayer, MembraneReadout))]
    pairs += [(m, "out", "out_norm") for m in folded.modules() if isinstance(m, ClsHead)]
    for owner, syn_name, norm_name in pairs:
        syn, bn = getattr(owner, syn_name), getattr(owner, norm_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = syn.bias if syn.bias is not None else torch.zeros_like(bn.running_mean)
        shape = [1] * syn.weight.ndim
        axis = 1 if isinstance(syn, nn.ConvTranspose2d) else 0
        shape[axis] = -1
        syn.weight.mul_(scale.reshape(shape))
        syn.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        setattr(owner, norm_name, nn.Identity())
    return folded


@torch.no_grad()
def from_twin(twin: "HybridMultiTaskNet", cfg: NetConfig, bn_scale: float) -> "HybridMultiTaskNet":
    """A spiking network initialised from a trained CNN twin (ANN-to-SNN conversion, the first half of
    Rathi et al., ICLR 2020, "hybrid conversion + spike-based backpropagation"): same weights, every
    BatchNorm's affine (gamma, beta) multiplied by ``bn_scale`` so the LIF neurons (threshold 1) fire
    at useful rates over T steps. The running statistics must then be re-estimated on spiking inputs
    (``training.recalibrate_batchnorm``) before the surrogate-gradient fine-tuning."""
    if not cfg.spiking:
        raise ValueError("from_twin builds the spiking network: cfg.spiking must be True")
    if twin.cfg.spiking:
        raise ValueError("from_twin expects a CNN twin (spiking=False)")
    model = HybridMultiTaskNet(cfg)
    model.load_state_dict(twin.state_dict())  # same topology: the same parameter and buffer names
    for m in batchnorms(model):
        m.weight.mul_(bn_scale)
        m.bias.mul_(bn_scale)
    return model


def build_model(cfg: NetConfig | None = None, **overrides) -> HybridMultiTaskNet:
    cfg = replace(cfg or NetConfig(), **overrides) if overrides else (cfg or NetConfig())
    return HybridMultiTaskNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["NetConfig", "HybridMultiTaskNet", "HybridLayer", "cnn_twin", "build_model", "count_parameters", "fold_batchnorm", "from_twin", "HEADS"]
