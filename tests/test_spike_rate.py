"""The firing-rate regulariser (TrainConfig.spike_rate_weight): the same tiny network trained the same way
fires measurably less with it (issue 18, sparse spikes), and the rate is logged with the losses."""
from __future__ import annotations

import torch

from hybrid_ct.net.energy import measure_energy
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.data.slice_store import SliceSet, slices_from_volume
from hybrid_ct.train.config import TrainConfig
from hybrid_ct.train.trainer import fit

NET = dict(levels=3, base_channels=4, fc_hidden=16, time_steps=2, in_size=64)


def _data():
    data = SliceSet.empty(NET["in_size"])
    for i in range(2):
        img, lab, _ = make_phantom(300 + i, shape=(8, 64, 64), positive=i == 0)
        data = data.extend(slices_from_volume(img, lab, f"p{i}", size=NET["in_size"]))
    return data


def _train(weight: float, data):
    torch.manual_seed(0)
    model = HybridMultiTaskNet(NetConfig(**NET))
    hist = fit(model, data, None, TrainConfig(epochs=3, batch_size=8, lr=3e-3, negative_fraction=1.0, augment=False,
                                               spike_rate_weight=weight), progress=False)
    x = torch.from_numpy(data.images[:8, None].astype("float32") / 255.0)
    # batch statistics (train mode): after a few steps the running statistics still silence eval mode
    with torch.no_grad():
        return measure_energy(model.train(), x).mean_firing_rate, hist


def test_the_regulariser_lowers_the_firing_rate():
    data = _data()
    plain, hist0 = _train(0.0, data)
    sparse, hist1 = _train(20.0, data)
    assert "spike_rate" not in hist0[-1]["loss"] and hist1[-1]["loss"]["spike_rate"] >= 0
    assert sparse < 0.85 * plain, (plain, sparse)  # measured: 0.038 -> 0.028


def test_rates_are_kept_only_inside_a_training_step():
    """Validation and later use of the model must not collect rates: each one held its forward graph
    (a build's validation grew to 17.5 GB and was killed)."""
    from hybrid_ct.train.trainer import Trainer

    data = _data()
    model = HybridMultiTaskNet(NetConfig(**NET))
    tr = Trainer(model, TrainConfig(epochs=1, batch_size=8, augment=False, spike_rate_weight=1.0), data, data)
    tr.fit()
    assert tr.history[-1]["loss"]["spike_rate"] > 0 and "val" in tr.history[-1]  # it trained and validated
    assert tr._rates == []  # nothing collected by the validation pass
    model(torch.rand(2, 1, NET["in_size"], NET["in_size"]))
    assert tr._rates == []  # the hooks are gone after fit
