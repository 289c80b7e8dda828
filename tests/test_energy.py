"""Energy meter: a tiny network computed by hand, the real network, and spikingjelly's op_counter."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hybrid_ct.net.energy import E_AC_PJ, E_MAC_PJ, EnergyMeter, measure_energy
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig, cnn_twin


class Tiny(nn.Module):
    """conv1 (1->1, 1x1) on the raw input once, then a known spike pattern over T=2 into conv2 (1->2, 1x1)."""

    def __init__(self, spikes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1)
        self.conv2 = nn.Conv2d(1, 2, 1)
        self.spikes = spikes

    def forward(self, x):
        self.conv1(x)
        return self.conv2(self.spikes)


def test_energy_of_a_tiny_network_by_hand():
    x = torch.full((1, 1, 2, 2), 0.3)  # batch 1, real-valued: 4 MACs
    spikes = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])  # [T*B=2,1,2,2]: 3 of 8 ones
    r = measure_energy(Tiny(spikes), x)
    # conv2 dense: 2 steps x 4 outputs x 2 channels x 1 input = 16 ops; 3/8 fire -> 6 accumulates
    assert r.e_hybrid_pj == pytest.approx(4 * E_MAC_PJ + 6 * E_AC_PJ)
    # CNN reference: every layer once (T = 1), all MACs: 4 + 8
    assert r.e_conv_pj == pytest.approx(12 * E_MAC_PJ)
    assert r.ratio == pytest.approx((4 * 4.6 + 6 * 0.9) / (12 * 4.6))
    kinds = {la.name: (la.kind, la.steps, la.input_rate) for la in r.layers}
    assert kinds == {"conv1": ("mac", 1, 1.0), "conv2": ("ac", 2, 0.375)}


def test_constants_follow_the_spec():
    assert (E_MAC_PJ, E_AC_PJ) == (4.6, 0.9)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    cfg = NetConfig(levels=3, base_channels=4, fc_hidden=16, time_steps=4)
    return HybridMultiTaskNet(cfg).train(), HybridMultiTaskNet(cnn_twin(cfg)).eval()


def test_hybrid_is_cheaper_and_e_conv_matches_the_cnn_twin(nets):
    hybrid, twin = nets
    x = torch.rand(2, 1, 32, 32)
    rh, rc = measure_energy(hybrid, x), measure_energy(twin, x)
    # E_conv of the hybrid is the twin's energy: the same architecture, ReLU, T = 1, all MACs
    assert rh.e_conv_pj == pytest.approx(rc.e_hybrid_pj, rel=1e-9)
    assert rc.ratio == pytest.approx(1.0)
    assert 0 < rh.ratio < 1
    assert 0 < rh.mean_firing_rate < 1 and rh.firing_rates
    first = [la for la in rh.layers if la.name == "encoder.levels.0.0.syn"]
    assert len(first) == 1 and first[0].kind == "mac" and first[0].steps == 1
    # every layer after the first that reads spikes is counted as accumulates at the measured rate
    spike_layers = [la for la in rh.layers if la.kind == "ac"]
    assert spike_layers and all(0 <= la.input_rate <= 1 for la in spike_layers)


def test_meter_accumulates_over_calls_per_input(nets):
    hybrid, _ = nets
    x = torch.rand(2, 1, 32, 32)
    hybrid.eval()
    single = measure_energy(hybrid, x)
    with torch.no_grad(), EnergyMeter(hybrid) as meter:
        hybrid(x[:1])
        hybrid(x[1:])
    both = meter.report()
    assert both.e_conv_pj == pytest.approx(single.e_conv_pj)
    assert both.e_hybrid_pj == pytest.approx(single.e_hybrid_pj, rel=1e-5)
    hybrid.train()


def test_spike_inputs_checked_once_per_layer_count_the_same(nets):
    """The meter decides whether a layer reads spikes on its first input (issue 16: the check was most of
    its cost); re-checking on every call, as before, gives the same report."""
    hybrid, _ = nets
    hybrid.train()  # a fresh network fires in train mode only (STACK.md)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad(), EnergyMeter(hybrid) as once:
        torch.manual_seed(0)
        hybrid(x[:2])
        hybrid(x[2:])
    with torch.no_grad(), EnergyMeter(hybrid) as every:
        torch.manual_seed(0)
        hybrid(x[:2])
        every._spike_input.clear()
        hybrid(x[2:])
    a, b = once.report(), every.report()
    assert a.e_hybrid_pj == pytest.approx(b.e_hybrid_pj, rel=1e-12) and a.ratio == pytest.approx(b.ratio, rel=1e-12)
    assert any(la.kind == "ac" and la.input_rate > 0 for la in a.layers)
    assert [la.kind for la in a.layers] == [la.kind for la in b.layers]


def _weight_uses(module: nn.Module, spikes: torch.Tensor) -> int:
    """Synaptic operations of ``module`` on a spike input counted from first principles: every spike times
    C_out times the kernel taps that land inside the output (fewer at the borders, where padding is)."""
    if isinstance(module, nn.Linear):
        return int(spikes.sum()) * module.out_features
    tr = isinstance(module, nn.ConvTranspose2d)
    per_dim = []
    for d in range(2):
        n, k, s, p = spikes.shape[2 + d], module.kernel_size[d], module.stride[d], module.padding[d]
        n_out = (n - 1) * s - 2 * p + k + module.output_padding[d] if tr else (n + 2 * p - k) // s + 1
        taps = []
        for i in range(n):
            outs = [i * s - p + kk for kk in range(k)] if tr else \
                   [(i + p - kk) // s for kk in range(k) if (i + p - kk) % s == 0]
            taps.append(sum(0 <= o < n_out for o in outs))
        per_dim.append(torch.tensor(taps, dtype=torch.float64))
    return int(torch.einsum("bchw,h,w->", spikes.double(), *per_dim)) * module.out_channels


def test_energy_meter_agrees_with_spikingjelly_op_counter():
    """The shipped network on a phantom slice, counted by EnergyMeter and by spikingjelly's op_counter
    (MACCounter + SynOpCounter, BatchNorm ignored: the meter assumes it folded):
    - MACs: equal, layer by layer (the first layer, once; the classifier's FC on the real-valued F);
    - spike-driven operations: the meter prices each input spike at C_out x k x k (#FP x R_fire, border
      effects ignored, as the SPEC's formula does), op_counter counts the taps that land inside the
      output; the difference is exactly the taps that fall on padding, computed here by hand. Equal for
      1x1 convs and linear layers, whose SynOps / C_out also give the upstream spike counts;
    - E_conv: 4.6 pJ x the MACs op_counter counts on the CNN twin (ReLU, T = 1)."""
    import numpy as np
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, SynOpCounter

    from hybrid_ct.net.checkpoint import load_checkpoint
    from hybrid_ct.net.model_files import PACKAGED_MODEL

    model, _ = load_checkpoint(PACKAGED_MODEL)
    x = torch.from_numpy(np.load(Path(__file__).parent / "data" / "shipped_model_reference.npz")["x"][1:2])
    bns = [nn.BatchNorm1d, nn.BatchNorm2d]
    mac, syn = MACCounter(extra_ignore_modules=bns), SynOpCounter(extra_ignore_modules=bns)
    spike_inputs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: spike_inputs.update({name: (m, i[0])})))
    with torch.no_grad(), EnergyMeter(model) as meter, DispatchCounterMode([mac, syn]):
        model(x)
    for h in hooks:
        h.remove()
    r = meter.report()
    assert 0.01 < r.mean_firing_rate < 0.5 and len(r.layers) == len(spike_inputs)

    def scope(counter, name):
        return sum(counter.get_counts().get(f"HybridMultiTaskNet.{name}", {}).values())

    border_taps = 0
    for la in r.layers:
        module, inp = spike_inputs[la.name]
        if la.kind == "mac":
            assert scope(mac, la.name) == la.dense_ops and scope(syn, la.name) == 0, la.name
            continue
        assert scope(mac, la.name) == 0, la.name
        exact = _weight_uses(module, inp)
        assert scope(syn, la.name) == exact, la.name
        k = 1 if isinstance(module, nn.Linear) else module.kernel_size[0] * module.kernel_size[1]
        cout = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        assert la.dense_ops * la.input_rate == pytest.approx(int(inp.sum()) * cout * k, rel=1e-6), la.name
        if k == 1:
            assert exact == pytest.approx(la.dense_ops * la.input_rate, rel=1e-6), la.name
        border_taps += la.dense_ops * la.input_rate - exact
    assert mac.get_total() == sum(la.dense_ops for la in r.layers if la.kind == "mac")
    assert 0 < border_taps < 0.1 * syn.get_total()  # the padding taps: a few % of the spike-driven work
    assert r.e_hybrid_pj == pytest.approx(E_MAC_PJ * mac.get_total() + E_AC_PJ * (syn.get_total() + border_taps))
    # spike counts: SynOps of the 1x1 output convs / C_out = spikes of the last decoder layer, as the meter saw them
    for head in ("lung", "infection"):
        fired = r.firing_rates[f"seg.{head}.blocks.3.1.act"] * spike_inputs[f"seg.{head}.out"][1].numel()
        assert scope(syn, f"seg.{head}.out") == pytest.approx(fired)

    twin = HybridMultiTaskNet(cnn_twin(model.cfg)).eval()
    twin_mac = MACCounter(extra_ignore_modules=bns)
    with torch.no_grad(), DispatchCounterMode([twin_mac]):
        twin(x)
    assert r.e_conv_pj == pytest.approx(E_MAC_PJ * twin_mac.get_total(), rel=1e-9)
