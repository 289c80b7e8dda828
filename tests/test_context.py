"""The 2.5D input (issue 18, point 1): neighbours at a fixed physical distance, pictures without any,
and the same code path through training, the slice store and inference."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hybrid_ct.processing.context import CONTEXT_MM, neighbours, with_context
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
from hybrid_ct.train.augment import SliceDataset
from hybrid_ct.data.slice_store import SliceSet, slices_from_arrays
from hybrid_ct.train.config import TrainConfig
from hybrid_ct.train.trainer import fit


def _ramp(d, s=8):
    """Slice k holds the value k everywhere."""
    return np.broadcast_to(np.arange(d, dtype=np.float32)[:, None, None, None], (d, 1, s, s)).copy()


def test_neighbours_lie_at_the_physical_distance_whatever_the_slice_spacing():
    for dz in (1.0, 2.5, 5.0):
        x = _ramp(40)
        nb = neighbours(x, dz, CONTEXT_MM)
        k = CONTEXT_MM / dz  # slices between a slice and its neighbour
        mid = np.arange(10, 30)
        assert np.allclose(nb[mid, 0, 0, 0], mid - k)
        assert np.allclose(nb[mid, 1, 0, 0], mid + k)
    nb = neighbours(_ramp(10), 2.0)  # 2.5 slices: linear interpolation between slices 2 and 3 above slice 0
    assert nb[0, 1, 0, 0] == pytest.approx(2.5)
    assert nb[0, 0, 0, 0] == 0 and nb[9, 1, 0, 0] == 9  # beyond the ends: the edge slice


def test_a_picture_is_its_own_neighbour_and_one_channel_is_untouched():
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    y = with_context(x, 3, dz_mm=2.0)
    assert y.shape == (1, 3, 8, 8) and all(np.array_equal(y[:, c], x[:, 0]) for c in range(3))
    stack = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
    assert with_context(stack, 1, dz_mm=2.0) is stack
    pics = with_context(stack, 3)  # no spacing: a folder of pictures, not a volume
    assert np.array_equal(pics[:, 0], stack[:, 0]) and np.array_equal(pics[:, 2], stack[:, 0])
    vol = with_context(stack, 3, dz_mm=5.0)  # a volume: the neighbours are the next slices
    assert np.array_equal(vol[1:, 0], stack[:-1, 0]) and np.array_equal(vol[:-1, 2], stack[1:, 0])


def test_slice_store_keeps_volume_neighbours_and_repeats_pictures():
    vol = slices_from_arrays(_ramp(6) / 10, None, "phantom_a", lung_known=False, infection_known=False, dz_mm=5.0)
    pic = slices_from_arrays(np.full((1, 1, 8, 8), 0.9, np.float32), None, "ucsd_b", lung_known=False,
                             infection_known=False)
    both = vol.extend(pic)
    assert both.context.shape == (7, 2, 8, 8)
    x = both.inputs(channels=3)
    assert x.shape == (7, 3, 8, 8)
    assert np.allclose(x[3, :, 0, 0], [0.2, 0.3, 0.4], atol=1 / 255)  # slice 3 of the volume: 2, 3, 4 (/10)
    assert np.allclose(x[6, :, 0, 0], 0.9, atol=1 / 255)  # the picture, three times
    assert np.array_equal(both.subset([3]).inputs(channels=3), x[3:4])
    assert both.inputs(channels=1).shape == (7, 1, 8, 8)
    ds = SliceDataset(both, augment=True, style=True, rotate_pictures=True, seed=0, channels=3)
    for i in range(len(ds)):  # every augmentation (JPEG included) keeps the three channels
        assert ds[i]["image"].shape == (3, 8, 8)


def _tiny(in_channels, spiking=True):
    return NetConfig(levels=3, base_channels=4, max_channels=16, time_steps=2, fc_hidden=16, cls_pool=2,
                     in_size=64, in_channels=in_channels, spiking=spiking)


def test_a_2p5d_network_trains_and_refuses_the_wrong_number_of_channels():
    from hybrid_ct.data.phantom import make_phantom
    from hybrid_ct.data.slice_store import slices_from_volume

    img, lab, _ = make_phantom(3, shape=(16, 64, 64))
    data = slices_from_volume(img, lab, "phantom_x", size=64)
    assert data.context is not None
    model = HybridMultiTaskNet(_tiny(3))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.zeros(1, 1, 64, 64))
    hist = fit(model, data, data, TrainConfig(epochs=1, batch_size=4, max_iters_per_epoch=2, augment=True))
    assert np.isfinite(hist[-1]["loss"]["total"])


def test_predict_with_a_2p5d_network_whole_volume_and_lung_slab_agree(tmp_path):
    from hybrid_ct.net.checkpoint import save_checkpoint
    from hybrid_ct.predict.predictor import Predictor
    from hybrid_ct.data.phantom import make_phantom

    torch.manual_seed(0)
    p = tmp_path / "tiny3.pt"
    save_checkpoint(p, HybridMultiTaskNet(_tiny(3)), {"version": "tiny-2p5d"})
    pred = Predictor.from_checkpoint(p)
    img, _, _ = make_phantom(0, shape=(40, 96, 96))
    pred.crop = False
    full, rep_full = pred.predict(img)
    pred.crop = True
    crop, rep_crop = pred.predict(img)
    assert full.GetSize() == img.GetSize()
    a, b = sitk.GetArrayFromImage(full), sitk.GetArrayFromImage(crop)
    ran = np.asarray(rep_crop["classification"]["slice_probability"]) != 0
    # the slab's slices see their true neighbours, so they come out as on the whole volume
    assert np.allclose(np.asarray(rep_crop["classification"]["slice_probability"])[ran],
                       np.asarray(rep_full["classification"]["slice_probability"])[ran])
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ"
    so = pred.run_slices(np.zeros((2, 1, 64, 64), np.float32))  # pictures: one channel in, context repeated
    assert so.lung.shape == (2, 1, 64, 64)


def test_context_dropout_shows_volume_slices_as_pictures():
    vol = slices_from_arrays(_ramp(6) / 10, None, "phantom_a", lung_known=False, infection_known=False, dz_mm=5.0)
    never = SliceDataset(vol, augment=False, seed=0, channels=3, context_dropout=1.0)  # no augmentation: none
    assert not torch.equal(never[3]["image"][0], never[3]["image"][1])
    always = SliceDataset(vol, augment=True, seed=0, channels=3, context_dropout=1.0)
    x = always._input(3)  # the input before augmentation (per-channel noise would blur the comparison)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[2], x[1])
    assert always[3]["image"].shape == (3, 8, 8)


def test_a_recipe_with_another_context_distance_is_refused(tmp_path):
    import json

    from hybrid_ct.errors import InputError
    from hybrid_ct.train.recipes import load_recipe

    r = load_recipe("shipped_2p5d")
    r["net"]["context_mm"] = 7.0  # the slice store holds neighbours at CONTEXT_MM only
    p = tmp_path / "other.json"
    p.write_text(json.dumps(r))
    with pytest.raises(InputError, match="context_mm"):
        load_recipe(p)


def test_the_replay_sample_keeps_the_neighbours(tmp_path):
    from hybrid_ct.data.slice_store import load_replay, save_replay

    vol = slices_from_arrays(_ramp(6) / 10, None, "phantom_a", lung_known=False, infection_known=False, dz_mm=5.0)
    save_replay(vol, tmp_path / "r.npz", n=4)
    back = load_replay(tmp_path / "r.npz")
    assert back.context is not None and np.array_equal(back.inputs(channels=3)[:, 1], back.inputs(channels=1)[:, 0])
    save_replay(SliceSet(vol.images, vol.lung, vol.infection, vol.cls, vol.group), tmp_path / "p.npz", n=4)
    assert load_replay(tmp_path / "p.npz").context is None
