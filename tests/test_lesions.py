"""Synthetic lesions in real lungs and scan-protocol variation (issue 27: hybrid_ct.data.lesions / .protocol)."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from hybrid_ct.data.lesions import (CONSOLIDATION_HU, GGO_HU, lesion_slice, synthesize, to_hu, to_window)
from hybrid_ct.data.protocol import VARIANTS, protocol_slice, variant
from hybrid_ct.data.slice_store import MISSING, SliceSet
from hybrid_ct.train.augment import SliceDataset

S = 128


def chest(shape=(S, S), seed=0):
    """An HU slice (or volume, leading z) with two lungs of -850 HU, soft tissue and vessels of -40 HU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[-2], :shape[-1]]
    body = ((yy - 64) / 50.0) ** 2 + ((xx - 64) / 60.0) ** 2 < 1
    lung = np.zeros(shape[-2:], bool)
    for cx in (38, 90):
        lung |= ((yy - 66) / 34.0) ** 2 + ((xx - cx) / 20.0) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape[-2:])
    hu[lung] = -850.0 + rng.normal(0, 15, lung.sum())
    vessels = np.zeros_like(lung)
    for _ in range(40):
        y, x = np.argwhere(lung)[rng.integers(lung.sum())]
        vessels |= (yy - y) ** 2 + (xx - x) ** 2 <= 2
    vessels &= lung
    hu[vessels] = -40.0
    if len(shape) == 3:
        hu, lung, vessels = (np.repeat(a[None], shape[0], 0) for a in (hu, lung, vessels))
    return hu.astype(np.float32), lung, vessels


@pytest.mark.parametrize("seed", range(6))
def test_mask_exact_and_inside_the_lung(seed):
    hu, lung, _ = chest()
    out, mask, foci = synthesize(hu, lung, seed, (2.7, 2.7))
    assert foci and mask.any()
    assert not (mask & ~lung).any()
    assert np.array_equal(out[~lung], hu[~lung])  # nothing outside the lung changes
    # every clearly changed pixel is in the mask or on its partial-volume rim
    changed = np.abs(out - hu) > 150
    rim = ndimage.binary_dilation(mask, iterations=2)
    assert not (changed & ~rim).any()
    assert sum(f.voxels for f in foci) >= mask.sum()


def test_deterministic_per_seed():
    hu, lung, _ = chest()
    a = synthesize(hu, lung, 7, (2.7, 2.7))
    b = synthesize(hu, lung, 7, (2.7, 2.7))
    c = synthesize(hu, lung, 8, (2.7, 2.7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    x, m = lesion_slice(to_window(hu), lung, np.random.default_rng(3))
    y, n = lesion_slice(to_window(hu), lung, np.random.default_rng(3))
    assert np.array_equal(x, y) and np.array_equal(m, n)


def core(mask, lung):  # the lesion's inside, away from the partial-volume rim
    return ndimage.binary_erosion(mask, iterations=1) & lung


def test_ground_glass_range_and_vessels_visible():
    hu, lung, vessels = chest()
    meds, seen = [], 0
    for seed in range(8):
        out, mask, _ = synthesize(hu, lung, seed, (2.7, 2.7), kinds=("ggo",), radius_mm=(15.0, 30.0))
        inside = core(mask, lung)
        par = inside & ~ndimage.binary_dilation(vessels, iterations=2)
        if par.sum() < 20:
            continue
        med = float(np.median(out[par]))
        meds.append(med)
        ves = inside & vessels
        if ves.sum():  # vessels through the ground glass: still clearly brighter than it (blend, not overwrite)
            seen += 1
            assert np.median(out[ves]) - med > 200
    assert len(meds) >= 5 and seen >= 2
    assert all(GGO_HU[0] - 60 <= m <= GGO_HU[1] + 60 for m in meds), meds


def test_consolidation_range_and_air_bronchograms():
    hu, lung, vessels = chest()
    meds, air = [], 0
    for seed in range(8):
        out, mask, _ = synthesize(hu, lung, seed, (2.7, 2.7), kinds=("consolidation",), radius_mm=(15.0, 30.0))
        inside = ndimage.binary_erosion(mask, iterations=3) & lung  # inside the ground-glass halo
        if inside.sum() < 20:
            continue
        solid = inside & (out > -700)
        meds.append(float(np.median(out[solid])))
        air += int((inside & (out < -800)).sum() > 0)
    assert len(meds) >= 5 and air >= 1
    assert all(CONSOLIDATION_HU[0] - 60 <= m <= CONSOLIDATION_HU[1] + 60 for m in meds), meds


def test_other_kinds_and_3d():
    hu, lung, _ = chest()
    for kind in ("crazy_paving", "band"):
        out, mask, foci = synthesize(hu, lung, 1, (2.7, 2.7), kinds=(kind,), n_foci=3, radius_mm=(10.0, 25.0))
        assert mask.any() and {f.kind for f in foci} == {kind} and not (mask & ~lung).any()
    vol, lung3, _ = chest((20, S, S))
    out, mask, foci = synthesize(vol, lung3, 2, (5.0, 2.7, 2.7), inferior_axis=0)
    assert mask.any() and not (mask & ~lung3).any() and np.array_equal(out[~lung3], vol[~lung3])
    assert len({f.centre[-1] < 64 for f in foci}) == 2 or len(foci) == 1  # both lungs when multifocal


def test_model_slice_in_window_space():
    hu, lung, _ = chest()
    x = to_window(hu)
    y, m = lesion_slice(np.stack([x, x, x]), lung, np.random.default_rng(0))
    assert y.shape == (3, S, S) and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    assert m.dtype == np.uint8 and m.any() and not (m.astype(bool) & ~lung).any()
    assert np.allclose(to_hu(y[1])[m == 1].mean(), to_hu(y[0])[m == 1].mean(), atol=1)


def slice_set():
    hu, lung, _ = chest()
    img = np.round(to_window(hu) * 255).astype(np.uint8)
    n = 6
    lungs = np.repeat(lung[None].astype(np.uint8), n, 0)
    miss = np.full((n, S, S), MISSING, np.uint8)
    inf = np.zeros((n, S, S), np.uint8)
    groups = ["imlab_a", "wholescan_b", "phantom_c", "majun20_coronacases_001", "medseg_x", "imlab_a"]
    infs = np.stack([miss[0], inf[0], inf[0], miss[0], inf[0], miss[0]])
    return SliceSet(np.repeat(img[None], n, 0), lungs, infs, np.array([-1, 0, 0, -1, 1, -1], np.int8), groups)


def test_slice_dataset_default_unchanged_and_synthesis():
    s = slice_set()
    a = SliceDataset(s, augment=True, style=True, seed=3)
    b = SliceDataset(s, augment=True, style=True, seed=3, synth_lesions=0.0, protocol_aug=0.0)
    state = b._synth_rng.bit_generator.state
    for i in range(len(s)):
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert b._synth_rng.bit_generator.state == state  # at 0 nothing is drawn: the old samples, bit for bit
    plain = SliceDataset(s, seed=3)  # no augmentation: the stored slice and targets as they are
    for i in range(len(s)):
        out = plain[i]
        assert torch.equal(out["image"], torch.from_numpy(s.inputs(i)[0]))
        assert int(out["cls"]) == max(int(s.cls[i]), 0) and bool(out["cls_mask"]) == (s.cls[i] >= 0)
    c = SliceDataset(s, augment=False, seed=3, synth_lesions=1.0)  # no augmentation: nothing synthesised
    assert int(c[0]["cls_mask"]) == 0
    d = SliceDataset(s, augment=True, seed=3, synth_lesions=1.0)
    d.aug = None  # the lesion alone
    for i, g in enumerate(s.group):
        out = d[i]
        if g.split("_")[0] in ("imlab", "wholescan", "phantom"):
            assert int(out["cls"]) == 1 and bool(out["cls_mask"]) and bool(out["infection_mask"])
            assert out["infection"].sum() > 0 and not ((out["infection"] > 0) & (out["lung"] < 0.5)).any()
        else:  # Ma Jun (COVID-19 patients, lesions without masks) and pictures are never touched
            assert torch.equal(out["image"], SliceDataset(s, seed=3)[i]["image"])


def test_protocol_slice_and_variants():
    hu, lung, _ = chest()
    rng = np.random.default_rng(0)
    y = protocol_slice(to_window(hu)[None], lung, rng, np.stack([to_window(hu)] * 2))
    assert y.shape == (1, S, S) and 0 <= y.min() and y.max() <= 1
    vol, lung3, _ = chest((12, 64, 64))
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((2.7, 2.7, 2.0))
    for name in VARIANTS:
        v = sitk.GetArrayFromImage(variant(img, name, lung3))
        assert v.shape == vol.shape and np.isfinite(v).all()
        if name.startswith("dense"):
            shift = float(np.median(v[lung3]) - np.median(vol[lung3]))
            assert abs(shift - int(name[5:])) < 25, shift
    with pytest.raises(ValueError):
        variant(img, "dense100")


def test_config_defaults_and_recipes():
    from hybrid_ct.train.config import TrainConfig
    from hybrid_ct.train.recipes import load_recipe

    assert TrainConfig().synth_lesions == 0.0 and TrainConfig().protocol_aug == 0.0
    base, synth, proto = (load_recipe(n) for n in ("shipped", "shipped_synth", "shipped_synth_protocol"))
    assert "synth_lesions" not in base["train"] and synth["train"]["synth_lesions"] > 0
    assert proto["train"]["protocol_aug"] > 0 and proto["train"]["synth_lesions"] == synth["train"]["synth_lesions"]
    assert {k: v for k, v in synth["train"].items() if k != "synth_lesions"} == base["train"]
    assert synth["net"] == base["net"] and synth["data"] == base["data"]
