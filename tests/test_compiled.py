"""The compiled network (issue 30, ``hybrid_ct.net.compiled``): the same outputs as the eager network and
the same energy report, counted from the spikes of the network that really runs.

The fast tests compile with dynamo's ``eager`` backend: the same graph capture (hooks traced into the
graph, ``fullgraph=True``: no graph break), no code generation, so the counts must equal the eager meter's
exactly. The slow test runs the real inductor path through ``Predictor`` (tiny network: ~40 s)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_ct.net.compiled import CompiledNet, compile_cache_dir
from hybrid_ct.net.energy import EnergyMeter
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig, batchnorms, fold_batchnorm

TINY = dict(levels=3, base_channels=4, max_channels=16, time_steps=2, fc_hidden=16, cls_pool=2, in_size=64)


def firing_net(seed: int = 0) -> HybridMultiTaskNet:
    """A tiny network whose neurons fire (a fresh one is silent in eval mode: STACK.md): BatchNorm gains x8."""
    torch.manual_seed(seed)
    model = HybridMultiTaskNet(NetConfig(**TINY))
    with torch.no_grad():
        for bn in batchnorms(model):
            bn.weight.mul_(8.0)
    return model.eval()


def _eager(model, x, batch):
    with EnergyMeter(model) as meter, torch.no_grad():
        outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}, meter.report()


def _compiled(net, x, batch):
    meter = EnergyMeter(net.net.net)  # never entered: the compiled copy counts itself
    outs = []
    for i in range(0, len(x), batch):
        o, calls = net(x[i:i + batch])
        meter.add_counts(len(o["lung"]), calls)
        outs.append(o)
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}, meter.report()


def _same_report(a, b, rel=1e-6):
    assert b.e_hybrid_pj == pytest.approx(a.e_hybrid_pj, rel=rel)
    assert b.e_conv_pj == pytest.approx(a.e_conv_pj, rel=rel)
    assert b.ratio == pytest.approx(a.ratio, rel=rel)
    assert b.mean_firing_rate == pytest.approx(a.mean_firing_rate, rel=rel)
    assert b.firing_rates.keys() == a.firing_rates.keys()
    for k in a.firing_rates:
        assert b.firing_rates[k] == pytest.approx(a.firing_rates[k], rel=rel, abs=1e-12)
    assert [(la.name, la.kind, la.steps) for la in b.layers] == [(la.name, la.kind, la.steps) for la in a.layers]
    for la, lb in zip(a.layers, b.layers):
        assert lb.dense_ops == la.dense_ops


def test_compiled_counts_equal_the_eager_meter_with_a_padded_last_batch():
    model = fold_batchnorm(firing_net())
    x = torch.rand(11, 1, 64, 64)  # 8 + 3: the last batch is padded to 8 and its padding dropped
    ref, ref_energy = _eager(model, x, 8)
    assert ref_energy.mean_firing_rate > 0.01  # the comparison means something: the layers fire
    assert {la.kind for la in ref_energy.layers} == {"ac", "mac"}
    net = CompiledNet(model, batch_size=8, backend="eager")
    out, energy = _compiled(net, x, 8)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    _same_report(ref_energy, energy)


def test_padding_is_not_counted():
    """The counts of 3 inputs padded to a batch of 8 equal those of the same 3 inputs run alone."""
    model = fold_batchnorm(firing_net(1))
    x = torch.rand(3, 1, 64, 64)
    _, alone = _eager(model, x, 3)
    _, padded = _compiled(CompiledNet(model, batch_size=8, backend="eager"), x, 8)
    _same_report(alone, padded)


def test_a_changed_input_rate_changes_the_counts():
    """The counts come from the run, not from the warm-up: brighter input, more spikes."""
    model = fold_batchnorm(firing_net(2))
    net = CompiledNet(model, batch_size=4, backend="eager")
    x = torch.rand(4, 1, 64, 64)
    _, dim = _compiled(net, 0.2 * x, 4)
    _, bright = _compiled(net, x, 4)
    assert bright.firing_rates != dim.firing_rates
    _, again = _compiled(net, 0.2 * x, 4)
    _same_report(dim, again, rel=0)


def test_more_inputs_than_the_batch_are_refused():
    net = CompiledNet(fold_batchnorm(firing_net()), batch_size=2, backend="eager")
    with pytest.raises(ValueError, match="at most 2"):
        net(torch.rand(3, 1, 64, 64))


def test_cache_dir_is_keyed_by_the_checkpoint(tmp_path):
    a, b = compile_cache_dir("a" * 64, tmp_path), compile_cache_dir("b" * 64, tmp_path)
    assert a != b and a.parent == tmp_path and torch.__version__ in a.name


@pytest.mark.slow
def test_predictor_compiled_equals_eager_on_a_phantom(tmp_path, small_phantom):
    """The real path (inductor, on-disk cache in the checkpoint's folder): label, call and burden as the
    eager Predictor, the energy report equal to float rounding or its difference bounded."""
    from hybrid_ct.net.checkpoint import save_checkpoint
    from hybrid_ct.predict.predictor import Predictor

    ckpt = save_checkpoint(tmp_path / "firing.pt", firing_net(), {"version": "firing"})
    img = small_phantom[0]
    eager = Predictor.from_checkpoint(ckpt, require_chest=False)
    cache = tmp_path / "cache"
    comp = Predictor.from_checkpoint(ckpt, require_chest=False, compile_net=True, compile_cache=cache)
    assert comp.compiled.compile_s > 0 and any(cache.rglob("*")), "inductor wrote nothing to the cache folder"
    lab_e, rep_e = eager.predict(img)
    lab_c, rep_c = comp.predict(img)
    import SimpleITK as sitk

    a, b = sitk.GetArrayFromImage(lab_e), sitk.GetArrayFromImage(lab_c)
    assert (a != b).mean() <= 1e-3
    assert rep_c["classification"]["label"] == rep_e["classification"]["label"]
    for k, v in rep_e["burden"].items():
        assert rep_c["burden"][k] == pytest.approx(v, abs=0.5)
    assert rep_e["energy"]["mean_firing_rate"] > 0.01
    for k, v in rep_e["energy"].items():
        assert rep_c["energy"][k] == pytest.approx(v, rel=1e-3), k
    assert np.allclose(rep_c["classification"]["slice_probability"], rep_e["classification"]["slice_probability"],
                       atol=0.05)
