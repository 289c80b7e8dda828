"""Training augmentation: 2D pictures turned and flipped, HU volumes kept in their orientation, style
transforms that keep the labels, and the same samples for the same seed."""
import numpy as np
import torch

from hybrid_ct.train.augment import SliceDataset, augmentations
from hybrid_ct.data.slice_store import SliceSet


def _set(groups):
    n = len(groups)
    img = np.zeros((n, 32, 32), np.uint8)
    img[:, :16, :8] = 200  # a bright block in the upper left quadrant, the lung mask on it
    return SliceSet(img, (img > 0).astype(np.uint8), np.zeros_like(img), np.zeros(n, np.int8), groups)


def _upper_left(m):
    return m[:16, :16].sum() / max(m.sum(), 1)


def test_pictures_are_turned_and_volumes_are_not():
    data = _set(["ucsd_a"] * 40 + ["phantom_1"] * 20 + ["wholescan_x"] * 20)
    # only the picture rotation: switch the general augmentation off to see it alone
    ds = SliceDataset(data, augment=True, rotate_pictures=True, seed=3)
    ds.aug = None
    samples = [ds[i] for i in range(len(data))]
    moved = [_upper_left(s["lung"][0].numpy()) < 0.5 for s in samples]
    assert 10 <= sum(moved[:40]) <= 38  # pictures: turned by 90/180/270 or flipped about 3 times in 4
    assert not any(moved[40:])  # HU volumes: never
    for s in samples:  # image and masks move together
        assert torch.equal(s["lung"] > 0, s["image"] > 0.5)


def test_same_seed_same_samples_and_style_keeps_labels():
    data = _set(["mosmed_a"] * 16)
    a = SliceDataset(data, augment=True, style=True, rotate_pictures=True, seed=7)
    b = SliceDataset(data, augment=True, style=True, rotate_pictures=True, seed=7)
    for i in range(16):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["lung"], sb["lung"])
        assert set(torch.unique(sa["lung"]).tolist()) <= {0.0, 1.0}  # masks stay binary
        assert sa["image"].shape == (1, 32, 32) and sa["image"].dtype == torch.float32


def test_every_style_transform_runs_and_changes_the_image():
    x = {"image": torch.rand(1, 32, 32), "lung": torch.zeros(1, 32, 32), "infection": torch.zeros(1, 32, 32)}
    for t in augmentations(style=True).transforms[4:]:  # the style part: gamma, blur, low resolution, JPEG
        t.prob = 1.0
        t.set_random_state(0)
        y = t(dict(x))
        assert y["image"].shape == (1, 32, 32) and not torch.allclose(torch.as_tensor(np.asarray(y["image"])), x["image"])
        assert torch.equal(torch.as_tensor(np.asarray(y["lung"])), x["lung"])
