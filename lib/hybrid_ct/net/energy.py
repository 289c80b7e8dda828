"""Energy meter (SPEC section 1, seed 002 eq. 16), counted from what really happens on the input.

Every conv / transposed conv / linear call is inspected through a forward hook:
- its dense operation count #FP is taken from the tensor shapes (MACs, border effects ignored);
- if its input is a spike tensor (all values 0 or 1) it costs #FP x R_fire accumulates (E_AC), with
  R_fire the measured share of ones in that very input, the T steps of a multi-step call summed;
- otherwise (the raw CT, or the real-valued joint feature F) it costs #FP multiply-accumulates
  (E_MAC), once per evaluation (static inputs are evaluated once, not T times).
E_conv is the same architecture with ReLU and T = 1: every layer evaluated once, all MACs.
BatchNorm is assumed folded into the preceding conv; pooling, neuron updates and concatenation
are not counted (the same convention as the seed).

Cross-checked against spikingjelly's ``op_counter`` (tests/test_energy.py): the MACs equal its
``MACCounter`` (BatchNorm ignored) layer by layer, and E_conv is 4.6 pJ x its MACs on the CNN twin.
The spike-driven count #FP x R_fire prices every input spike at C_out x k x k; ``SynOpCounter``
counts only the kernel taps that land inside the output, so it is lower by exactly the taps on the
zero padding (3.8 % of the accumulates, 3.3 % of E_hybrid, on the shipped model at 128 x 128); equal
for 1x1 convs and linear layers. The meter stays on the SPEC's formula; op_counter's BatchNorm /
element-wise AC and memory terms (``SimpleEnergyProfiler``) are outside the SPEC.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron

E_MAC_PJ = 4.6  # 45 nm, 32-bit multiply-accumulate
E_AC_PJ = 0.9  # 45 nm, 32-bit add (seed 002: the MAC costs 5.1x the add)


@dataclass
class LayerEnergy:
    name: str
    kind: str  # "mac" (real-valued input) or "ac" (spike input)
    dense_ops: float  # #FP of this call (summed over the time steps it covers)
    steps: int  # time steps this call covers (1 for a static input computed once)
    input_rate: float  # share of ones in a spike input (1.0 for a real-valued input)
    energy_pj: float


@dataclass
class EnergyReport:
    e_hybrid_pj: float
    e_conv_pj: float
    ratio: float
    mean_firing_rate: float  # all spikes / (all neurons x T), over every spiking layer
    firing_rates: dict = field(default_factory=dict)  # neuron layer -> rate
    layers: list = field(default_factory=list)
    time_steps: int = 1

    def summary(self) -> dict:
        """Compact, JSON-friendly numbers for reports (energy in microjoules per input)."""
        return {"e_hybrid_uj": self.e_hybrid_pj * 1e-6, "e_conv_uj": self.e_conv_pj * 1e-6,
                "ratio": self.ratio, "mean_firing_rate": self.mean_firing_rate}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(self.summary())
        return d


def dense_ops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> float:
    """Multiply-accumulate count of one call from the tensor shapes."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        return inp.numel() * (module.out_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return inp.numel() // module.in_features * module.in_features * module.out_features
    raise TypeError(type(module))


def _is_spike(x: torch.Tensor) -> bool:
    return bool(torch.all((x == 0) | (x == 1)).item())


class EnergyMeter:
    """Context manager counting energy over every forward call made inside it (e.g. all slices of a volume).

    with EnergyMeter(model) as meter:
        model(x1); model(x2)
    report = meter.report()   # per input image (per slice)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: list[LayerEnergy] = []
        self.spikes: dict[str, list[float]] = {}
        self.inputs = 0
        self._hooks = []
        self._batch = 1
        self._spike_input: dict[str, bool] = {}  # per layer: does it read spikes? (checked on its first input)

    def _syn_hook(self, name):
        def hook(module, inputs, output):
            inp = inputs[0]
            ops = float(dense_ops(module, inp, output))
            steps = max(1, inp.shape[0] // self._batch)
            # Whether a layer reads spikes is a property of the network, not of the batch: checked on the
            # layer's first input inside this meter, not on every batch (the check reads the whole input
            # tensor several times: ~2/3 of the meter's cost over a volume). The rate below is
            # still measured on every input.
            spike = self._spike_input.get(name)
            if spike is None:
                spike = self._spike_input[name] = _is_spike(inp)
            if spike:
                rate = float(inp.detach().float().mean())
                self.layers.append(LayerEnergy(name, "ac", ops, steps, rate, ops * rate * E_AC_PJ))
            else:
                self.layers.append(LayerEnergy(name, "mac", ops, steps, 1.0, ops * E_MAC_PJ))
        return hook

    def _neuron_hook(self, name):
        def hook(module, inputs, output):
            s = self.spikes.setdefault(name, [0.0, 0.0])
            s[0] += float(output.detach().sum())
            s[1] += output.numel()
        return hook

    def _pre_hook(self, module, args):
        self._batch = args[0].shape[0]
        self.inputs += self._batch

    def add_counts(self, n: int, calls: list) -> None:
        """Count a forward pass of ``n`` inputs made outside the hooks: ``calls`` are the per-call records of
        ``hybrid_ct.net.compiled.CompiledNet`` (the compiled network returns them), in call order --
        ("syn", name, dense ops of the n inputs, steps, input elements per input, ones in the input,
        elements that are neither 0 nor 1) or ("neuron", name, spikes, outputs per input). The same
        arithmetic as the hooks (tests/test_compiled.py)."""
        self.inputs += n
        for call in calls:
            if call[0] == "syn":
                _, name, ops, steps, numel, ones, other = call
                spike = self._spike_input.get(name)
                if spike is None:
                    spike = self._spike_input[name] = other == 0
                if spike:
                    rate = ones / (numel * n) if numel * n else 0.0
                    self.layers.append(LayerEnergy(name, "ac", ops, steps, rate, ops * rate * E_AC_PJ))
                else:
                    self.layers.append(LayerEnergy(name, "mac", ops, steps, 1.0, ops * E_MAC_PJ))
            else:
                _, name, spikes, numel = call
                s = self.spikes.setdefault(name, [0.0, 0.0])
                s[0] += spikes
                s[1] += numel * n

    def __enter__(self):
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_hook))
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                self._hooks.append(m.register_forward_hook(self._syn_hook(name)))
            elif isinstance(m, neuron.BaseNode):
                self._hooks.append(m.register_forward_hook(self._neuron_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return False

    def report(self) -> EnergyReport:
        n = max(self.inputs, 1)
        e_hybrid = sum(la.energy_pj for la in self.layers)
        e_conv = sum(la.dense_ops / la.steps * E_MAC_PJ for la in self.layers)
        total = sum(s[0] for s in self.spikes.values())
        count = sum(s[1] for s in self.spikes.values())
        return EnergyReport(
            e_hybrid_pj=e_hybrid / n,
            e_conv_pj=e_conv / n,
            ratio=e_hybrid / e_conv if e_conv else float("nan"),
            mean_firing_rate=total / count if count else 0.0,
            firing_rates={k: s[0] / s[1] for k, s in self.spikes.items() if s[1]},
            layers=self.layers,
            time_steps=getattr(getattr(self.model, "cfg", None), "time_steps", 1),
        )


@torch.no_grad()
def measure_energy(model: nn.Module, x: torch.Tensor) -> EnergyReport:
    """Run ``model(x)`` once and count its energy per input image."""
    with EnergyMeter(model) as meter:
        model(x)
    return meter.report()
