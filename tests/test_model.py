"""The hybrid network: shapes, configuration, state reset, static-input reuse, CNN twin, gradients,
and the shipped checkpoint against outputs stored from the original (pre-spikingjelly-containers) code."""
from pathlib import Path

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import neuron

from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig, cnn_twin

# Outputs of the shipped checkpoint on three phantom slices, written by the model code of commit 5707d00
# (hand-written [T*B] <-> [T, B] reshapes): `PYTHONPATH=<checkout of 5707d00>/lib python tests/test_model.py`.
REFERENCE = Path(__file__).parent / "data" / "shipped_model_reference.npz"


def tiny(**kw):
    base = dict(levels=3, base_channels=4, fc_hidden=16, time_steps=3, in_size=32)
    base.update(kw)
    return NetConfig(**base)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.rand(2, 1, 32, 32)


def test_outputs_have_the_expected_shapes(x):
    out = HybridMultiTaskNet(tiny()).train()(x)
    assert out["cls_rates"].shape == (2, 2) and out["cls_logits"].shape == (2, 2)
    assert out["lung"].shape == out["infection"].shape == (2, 1, 32, 32)
    r = out["cls_rates"]
    assert torch.all((r >= 0) & (r <= 1))
    # firing rates are spike counts / T
    assert torch.allclose(r * 3, torch.round(r * 3))


def test_default_is_the_seed_002_embodiment():
    cfg = NetConfig()
    assert (cfg.levels, cfg.fc_layers, cfg.in_size, cfg.heads) == (5, 2, 256, ("cls", "lung", "infection"))
    m = HybridMultiTaskNet(cfg)
    assert len(m.encoder.levels) == 5 and len(m.seg) == 2
    lifs = [mod for mod in m.modules() if isinstance(mod, neuron.LIFNode)]
    assert lifs and all(mod.step_mode == "m" for mod in lifs)


def test_spiking_layers_emit_binary_spikes(x):
    m = HybridMultiTaskNet(tiny()).train()
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: seen.append(o)) for mod in m.modules()
             if isinstance(mod, neuron.LIFNode)]
    m(x)
    for h in hooks:
        h.remove()
    assert seen and all(torch.all((o == 0) | (o == 1)) for o in seen)
    assert any(o.sum() > 0 for o in seen)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_same_input_twice_is_bit_identical(x, mode):
    m = HybridMultiTaskNet(tiny())
    m.train(mode == "train")
    if mode == "train":  # BN batch statistics must not change between the two calls
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.momentum = 0.0
    with torch.no_grad():
        a, b = m(x), m(x)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_membrane_state_would_leak_without_reset(x):
    """The reason for the reset: a spikingjelly neuron keeps its membrane between calls."""
    lif = neuron.LIFNode(tau=2.0, step_mode="m")
    seq = torch.full((2, 4), 1.2)  # v: 0.6, 0.9 (no spike); a second call starts at 0.9 and fires
    first = lif(seq).clone()
    second = lif(seq)
    assert not torch.equal(first, second)


def test_static_first_layer_equals_naive_per_step_loop(x):
    torch.manual_seed(1)
    fast = HybridMultiTaskNet(tiny(reuse_static=True)).train()
    naive = HybridMultiTaskNet(tiny(reuse_static=False)).train()
    naive.load_state_dict(fast.state_dict())
    for m in (fast, naive):
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.momentum = 0.0
    a, b = fast(x), naive(x)
    for k in ("cls_logits", "lung", "infection"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert torch.equal(a["cls_rates"], b["cls_rates"])


def test_cnn_twin_is_same_topology_with_relu_and_one_step(x):
    cfg = cnn_twin(tiny())
    assert cfg.time_steps == 1 and not cfg.spiking
    twin, hybrid = HybridMultiTaskNet(cfg), HybridMultiTaskNet(tiny())
    assert [tuple(p.shape) for p in twin.parameters()] == [tuple(p.shape) for p in hybrid.parameters()]
    assert not any(isinstance(m, neuron.BaseNode) for m in twin.modules())
    assert any(isinstance(m, torch.nn.ReLU) for m in twin.modules())
    out = twin.eval()(x)
    torch.testing.assert_close(out["cls_rates"].sum(1), torch.ones(2))


@pytest.mark.parametrize("kw", [dict(neuron="plif"), dict(surrogate="sigmoid", tau=3.0, v_threshold=0.5),
                                dict(heads=("lung",)), dict(heads=("cls", "infection"), fc_layers=1),
                                dict(deep_supervision=True, skip=False, up_kernel=5), dict(grad_checkpoint=True),
                                dict(grad_checkpoint=True, spiking=False)])
def test_configurations_train(x, kw):
    m = HybridMultiTaskNet(tiny(**kw)).train()
    out = m(x)
    loss = sum(v.float().mean() for k, v in out.items() if torch.is_tensor(v))
    loss = loss + sum(a.mean() for k, v in out.items() if k.endswith("_aux") for a in v)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # the surrogate gradient reaches the first layer through the spikes
    first = m.encoder.levels[0][0].syn.weight.grad
    assert first is not None and first.abs().sum() > 0


def test_grad_checkpoint_gives_the_same_gradients(x):
    torch.manual_seed(2)
    a = HybridMultiTaskNet(tiny()).train()
    b = HybridMultiTaskNet(tiny(grad_checkpoint=True)).train()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        out = m(x)
        (out["lung"].mean() + out["cls_logits"].sum()).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bad_configurations_and_inputs_are_refused():
    with pytest.raises(ValueError, match="tau"):
        NetConfig(tau=1.0)
    with pytest.raises(ValueError, match="heads"):
        NetConfig(heads=("cls", "liver"))
    with pytest.raises(ValueError, match="neuron"):
        NetConfig(neuron="izhikevich")
    m = HybridMultiTaskNet(tiny())
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        m(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples"):
        m(torch.rand(1, 1, 30, 30))


def test_config_round_trips_through_a_dict():
    cfg = tiny(neuron="plif", heads=("cls", "lung"))
    assert NetConfig.from_dict(cfg.to_dict()) == cfg


def test_fused_inference_lif_equals_spikingjelly():
    from hybrid_ct.net.network import lif_inference

    torch.manual_seed(3)
    x = torch.randn(6, 2, 3, 8, 8) * 1.5 + 0.8
    for tau, thr in [(2.0, 1.0), (3.5, 0.6)]:
        ref = neuron.LIFNode(tau=tau, v_threshold=thr, v_reset=0.0, step_mode="m")
        assert torch.equal(lif_inference(x, tau, thr), ref(x))


def test_eval_network_uses_the_fused_path_with_identical_output(x):
    m = HybridMultiTaskNet(tiny()).eval()
    with torch.no_grad():
        fused = m(x)
    with torch.enable_grad():  # grad enabled -> spikingjelly's own LIF
        ref = m(x)
    for k in fused:
        assert torch.equal(fused[k], ref[k].detach()), k


def test_energy_meter_counts_spikes_on_the_fused_path(x):
    from hybrid_ct.net.energy import measure_energy

    m = HybridMultiTaskNet(tiny()).train()
    for mod in m.modules():  # running statistics = this batch's, so the eval network fires
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = 1.0
    m(x)
    m.eval()
    fused = measure_energy(m, x)  # no_grad inside: fused LIF
    with torch.enable_grad():
        from hybrid_ct.net.energy import EnergyMeter

        with EnergyMeter(m) as meter:
            m(x)
    ref = meter.report()
    assert fused.mean_firing_rate > 0
    assert fused.firing_rates == pytest.approx(ref.firing_rates)


def test_grad_checkpoint_updates_batchnorm_statistics_once(x):
    torch.manual_seed(4)
    a = HybridMultiTaskNet(tiny()).train()
    b = HybridMultiTaskNet(tiny(grad_checkpoint=True)).train()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m(x)["lung"].mean().backward()
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if "running" in n:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("spiking", [True, False])
def test_folding_batchnorm_keeps_the_output(x, spiking):
    from hybrid_ct.net.network import fold_batchnorm

    torch.manual_seed(5)
    m = HybridMultiTaskNet(tiny(spiking=spiking, up_kernel=5)).train()
    for _ in range(3):  # give BN non-trivial running statistics
        m(torch.rand(4, 1, 32, 32) * 2)
    m.eval()
    folded = fold_batchnorm(m)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in folded.modules())
    with torch.no_grad():
        a, b = m(x), folded(x)
    torch.testing.assert_close(a["cls_logits"], b["cls_logits"], rtol=1e-3, atol=1e-3)
    # spikes may flip only where a membrane sits within float rounding of the threshold
    for k in ("lung", "infection"):
        assert (a[k] - b[k]).abs().max() < 1e-2, k


def test_from_twin_copies_weights_and_scales_batchnorm(x):
    from hybrid_ct.net.network import from_twin

    torch.manual_seed(1)
    twin = HybridMultiTaskNet(cnn_twin(tiny()))
    for m in twin.modules():  # a trained twin has non-trivial affine parameters
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    snn = from_twin(twin, tiny(), bn_scale=3.0)
    assert snn.cfg.spiking and any(isinstance(m, neuron.BaseNode) for m in snn.modules())
    a, b = twin.state_dict(), snn.state_dict()
    assert a.keys() == b.keys()
    scaled = {n + s for n, m in snn.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              for s in (".weight", ".bias")}
    assert scaled
    for k in a:
        if k in scaled:
            torch.testing.assert_close(b[k], 3.0 * a[k])
        else:
            assert torch.equal(a[k], b[k]), k
    out = snn.eval()(x)
    assert set(out["lung"].unique().tolist()) != set() and torch.isfinite(out["lung"]).all()
    with pytest.raises(ValueError):
        from_twin(snn, tiny(), 3.0)  # a spiking network is not a twin
    with pytest.raises(ValueError):
        from_twin(twin, cnn_twin(tiny()), 3.0)  # nor is the target a twin


def _phantom_slices() -> np.ndarray:
    """Three 128 x 128 model slices of a synthetic positive phantom: little, much and no infection."""
    from hybrid_ct.data.phantom import make_phantom
    from hybrid_ct.processing.transforms import to_model_slices

    img, _, _ = make_phantom(7, shape=(16, 128, 128), positive=True)
    return to_model_slices(img, 128)[0][[4, 7, 13]]


def _shipped_outputs(x: np.ndarray) -> dict:
    from hybrid_ct.net.checkpoint import load_checkpoint
    from hybrid_ct.net.model_files import PACKAGED_MODEL

    model, _ = load_checkpoint(PACKAGED_MODEL)  # strict load_state_dict: the same keys as shipped
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return {"lung": torch.sigmoid(out["lung"]).numpy(), "infection": torch.sigmoid(out["infection"]).numpy(),
            "prob": model.positive_probability(out).numpy(), "cls_rates": out["cls_rates"].numpy()}


def test_shipped_checkpoint_gives_the_original_outputs():
    ref = np.load(REFERENCE)
    out = _shipped_outputs(ref["x"])  # the stored input: independent of later preprocessing changes
    assert ref["lung"].max() > 0.5 and ref["infection"].max() > 0.5  # the reference is not trivial
    for k in ("lung", "infection", "prob"):
        np.testing.assert_allclose(out[k], ref[k], rtol=0, atol=1e-5, err_msg=k)
    np.testing.assert_array_equal(out["cls_rates"], ref["cls_rates"])


if __name__ == "__main__":
    x = _phantom_slices()
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, x=x, **_shipped_outputs(x))
    print(REFERENCE, REFERENCE.stat().st_size, "bytes")
