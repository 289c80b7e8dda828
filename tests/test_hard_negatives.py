"""Hard negatives (issue 18, point 4): the negatives the model gets most wrong come twice in an epoch."""

import numpy as np
import torch

from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.train.trainer import Trainer, negative_errors
from hybrid_ct.data.slice_store import SliceSet, slices_from_volume
from hybrid_ct.train.config import TrainConfig, epoch_indices


def _set(n_pos: int, n_neg: int) -> SliceSet:
    z = np.zeros((n_pos + n_neg, 4, 4), np.uint8)
    cls = np.array([1] * n_pos + [0] * n_neg, np.int8)
    return SliceSet(z, z.copy(), z.copy(), cls, [f"g{i}" for i in range(n_pos + n_neg)])


def test_without_errors_the_draw_is_the_old_one():
    data = _set(5, 20)
    a = epoch_indices(data, 0.5, np.random.default_rng(3))
    b = epoch_indices(data, 0.5, np.random.default_rng(3), errors=np.full(25, np.nan), hard=0.0)
    c = epoch_indices(data, 0.5, np.random.default_rng(3), errors=None, hard=0.25)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_the_worst_negatives_come_twice_and_the_count_is_unchanged():
    data = _set(5, 20)
    errors = np.full(25, np.nan)
    errors[5:15] = np.linspace(0.0, 0.9, 10)  # seen negatives 5..14; 14 is the worst, then 13, 12
    errors[0:5] = 5.0  # positives: never picked as negatives
    for frac in (0.5, 1.0):
        idx = epoch_indices(data, frac, np.random.default_rng(0), errors, hard=0.25)
        k = int(np.ceil(20 * frac))
        assert len(idx) == 5 + k and set(range(5)) <= set(idx.tolist())
        n_worst = round(0.25 * k)
        counts = np.bincount(idx, minlength=25)
        worst = list(range(14, 14 - n_worst, -1))
        assert (counts[worst] == 2).all()
        assert (counts[[i for i in range(5, 25) if i not in worst]] <= 1).all()


def test_negative_errors_read_the_class_and_the_false_outline():
    out = {"cls_logits": torch.tensor([[4.0, -4.0], [-4.0, 4.0], [4.0, -4.0]]),
           "infection": torch.full((3, 1, 4, 4), -5.0)}
    out["infection"][2, 0, :2] = 5.0  # half of the third slice outlined as infection
    batch = {"image": torch.zeros(3, 1, 4, 4), "infection": torch.zeros(3, 1, 4, 4),
             "infection_mask": torch.tensor([True, True, True])}
    e = negative_errors(out, batch).numpy()
    assert e[0] < 0.01 and 0.99 < e[1] < 1.01 and 9.9 < e[2] < 10.1
    batch["infection_mask"] = torch.tensor([True, True, False])  # unknown infection: only the class counts
    assert negative_errors(out, batch).numpy()[2] < 0.01


def test_the_trainer_records_each_negative_it_trained_on():
    from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig

    img, lab, _ = make_phantom(2, shape=(12, 64, 64), positive=False)
    data = slices_from_volume(img, lab, "neg", size=32, diagnosis=0)
    net = HybridMultiTaskNet(NetConfig(levels=3, base_channels=4, max_channels=8, fc_hidden=8, spiking=False,
                                       in_size=32))
    cfg = TrainConfig(epochs=2, batch_size=4, negative_fraction=1.0, hard_negatives=0.25, augment=False)
    tr = Trainer(net, cfg, data)
    tr.fit()
    assert tr.errors is not None and not np.isnan(tr.errors).any() and (tr.errors >= 0).all()
    assert Trainer(net, TrainConfig(epochs=1), data).errors is None  # off by default
