"""Energy meter: a tiny network computed by hand, then the real network."""
import pytest
import torch
import torch.nn as nn

from hybrid_ct.energy import E_AC_PJ, E_MAC_PJ, EnergyMeter, measure_energy
from hybrid_ct.model import HybridMultiTaskNet, NetConfig, cnn_twin


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
