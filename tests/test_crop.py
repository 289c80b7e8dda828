"""Doing less work gives the same answer (issue 16, hybrid_ct.processing.crop): the post-processing rules on the
lungs' box equal the same rules on the whole volume, and ``Predictor`` with the lung slab (network on
the lung slices only) gives the label and report of the network on every slice, on a phantom and, where
the data is present, on the real COVID-CT-MD P001 series."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.processing.anatomy import _plausible, plausible_lungs
from hybrid_ct.processing.crop import foreground_box, grow_slab, lung_slab, shifted_origin
from hybrid_ct.processing.scan_call import scan_features
from hybrid_ct.processing.postprocess import _keep_components, keep_lung_components
from hybrid_ct.processing.burden import infection_burden

from test_anatomy import SPACING, synthetic_chest

P001 = "volumes_covid_ct_md/P001"


def test_foreground_box_margin_alignment_and_empty():
    m = np.zeros((6, 20, 30), bool)
    m[2:4, 5:9, 11:17] = True
    box = foreground_box(m, margin=1, align=(1, 3, 3))
    assert box == (slice(1, 5), slice(3, 10), slice(9, 18))  # starts 4 -> 3, 10 -> 9 on the grid of 3
    assert foreground_box(np.zeros((3, 4, 4), bool)) is None
    assert foreground_box(np.zeros((0, 4, 4), bool)) is None
    m[:] = True
    assert foreground_box(m) == (slice(0, 6), slice(0, 20), slice(0, 30))


def _messy_label(seed: int = 0):
    """A label map with what every rule acts on: two lungs, infection, specks, lung outside the body
    (reaching and not reaching the image border) and a body mask."""
    hu, label, _ = synthetic_chest()
    rng = np.random.default_rng(seed)
    label = label.copy()
    for _ in range(12):  # specks
        z, y, x = rng.integers(0, label.shape[0]), rng.integers(0, 96), rng.integers(0, 96)
        label[z, y:y + 2, x:x + 2] = 1
    body = hu > -500
    body |= np.asarray([ndimage_fill(s) for s in body])
    label[10:14, 1:4, 40:50] = 1  # outside the body, not at the border
    label[20:30, 0:3, 60:70] = 1  # outside the body, at the border
    return hu, label, body


def ndimage_fill(s):
    from scipy import ndimage

    return ndimage.binary_fill_holes(s)


@pytest.mark.parametrize("with_body", [False, True])
def test_keep_lung_components_on_the_box_equals_the_whole_volume(with_body):
    _, label, body = _messy_label()
    body = body if with_body else None
    whole = _keep_components(label, label > 0, 0.05, body, single=False)
    assert np.array_equal(keep_lung_components(label, body=body), whole)
    one = label[20:21]  # a single picture: the border exception
    b1 = body[20:21] if with_body else None
    assert np.array_equal(keep_lung_components(one, body=b1), _keep_components(one, one > 0, 0.05, b1, single=True))


@pytest.mark.parametrize("flip", [False, True])
def test_plausible_lungs_on_the_box_equals_the_whole_volume(flip):
    hu, label, truth = synthetic_chest()
    big_hu = np.full((52, 128, 140), -1000.0)  # the chest placed off-centre in a larger field of view
    big = np.zeros(big_hu.shape, np.uint8)
    big_hu[5:45, 17:113, 31:127], big[5:45, 17:113, 31:127] = hu, label
    direction, origin = (1, 0, 0, 0, 1, 0, 0, 0, 1), (-10.0, 20.0, 5.0)
    if flip:
        big, big_hu = big[::-1].copy(), big_hu[::-1].copy()
        direction, origin = (1, 0, 0, 0, 1, 0, 0, 0, -1), (-10.0, 20.0, 200.0)
    body = big_hu > -990
    whole = _plausible(big, big > 0, big_hu, SPACING, direction, origin, body, 0.05, 3.0)
    out = plausible_lungs(big, big_hu, SPACING, direction, origin, body=body)
    assert np.array_equal(out, whole)
    assert not np.array_equal(out, big), "the rule should act on this chest (gas under the diaphragm)"


def test_shifted_origin_is_the_physical_point_of_the_box_start():
    img = sitk.Image(30, 20, 10, sitk.sitkUInt8)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-3.0, 4.0, 100.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    got = shifted_origin(img.GetOrigin(), img.GetSpacing(), img.GetDirection(), (4, 7, 9))
    assert np.allclose(got, img.TransformIndexToPhysicalPoint((9, 7, 4)))


def test_report_volumes_are_those_of_the_whole_volume():
    """Burden (left / right from physical x) and lesion volumes: the label alone, and the same label in a
    larger volume whose origin puts it at the same physical place, agree."""
    _, label, _ = synthetic_chest()
    img = sitk.GetImageFromArray(label)
    img.SetSpacing(SPACING)
    img.SetOrigin((-70.0, -70.0, 0.0))
    big = np.zeros((50, 120, 130), np.uint8)
    big[3:43, 11:107, 20:116] = label
    big_img = sitk.GetImageFromArray(big)
    big_img.SetSpacing(SPACING)
    big_img.SetOrigin(shifted_origin(img.GetOrigin(), SPACING, img.GetDirection(), (-3, -11, -20)))
    assert infection_burden(big_img) == pytest.approx(infection_burden(img), abs=1e-12)
    area = np.ones(5)
    f1, f2 = scan_features(label, SPACING, np.full(5, 0.5), area), scan_features(big, SPACING, np.full(5, 0.5), area)
    assert f1 == f2 and f1["lesions"] >= 1
    empty = scan_features(np.zeros((4, 8, 8), np.uint8), SPACING, np.zeros(4), np.zeros(4))
    assert empty["infection_ml"] == 0 and empty["lung_ml"] == 0
    assert infection_burden(np.zeros((4, 8, 8), np.uint8)) == {"total_pct": 0.0, "left_pct": 0.0, "right_pct": 0.0}


def test_lung_slab_holds_the_lungs_and_leaves_out_the_rest():
    from hybrid_ct.imaging.body import body_mask
    from hybrid_ct.data.phantom import make_phantom
    from hybrid_ct.processing.grid import orientation, to_canonical

    img, truth, _ = make_phantom(0, shape=(60, 128, 128))
    perm, flips = orientation(img.GetDirection())
    canon = [to_canonical(a, perm, flips) for a in
             (sitk.GetArrayFromImage(img), body_mask(img), sitk.GetArrayFromImage(truth))]
    hu, body, truth = canon
    sp = tuple(np.asarray(tuple(reversed(img.GetSpacing())))[list(perm)])
    z0, z1 = lung_slab(hu, body, sp)
    lung_z = np.flatnonzero((truth > 0).any(axis=(1, 2)))
    assert z1 - z0 < len(hu), "the phantom's slab should leave out slices below the lungs"
    assert z0 <= lung_z[0] and z1 > lung_z[-1], (z0, z1, lung_z[[0, -1]])
    assert lung_slab(hu[:7], body[:7], sp) is None  # a short stack: every slice
    assert lung_slab(hu, None, sp) is None
    assert lung_slab(np.full_like(hu, 40.0), body, sp) is None  # no air inside the body


def test_grow_slab_follows_lung_on_an_edge_slice():
    area = np.zeros(40)
    area[10:30] = 100.0
    assert grow_slab(area, 5, 35, 40, 4) == (5, 35)  # edges clean
    assert grow_slab(area, 12, 35, 40, 4) == (8, 35)  # lung on the lower edge: grow by a step
    assert grow_slab(area, 12, 28, 40, 4) == (8, 32)
    assert grow_slab(area, 0, 28, 40, 30) == (0, 40)  # clipped to the volume
    assert grow_slab(np.zeros(40), 5, 35, 40, 4) == (5, 35)


def _compare_paths(img):
    from hybrid_ct.predict.predictor import Predictor
    from hybrid_ct.net.model_files import default_model_path

    pred = Predictor.from_checkpoint(default_model_path())
    pred.crop = False
    full_label, full = pred.predict(img)
    pred.crop = True
    crop_label, crop = pred.predict(img)
    a, b = sitk.GetArrayFromImage(full_label), sitk.GetArrayFromImage(crop_label)
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ"
    for key in ("burden", "grade"):
        assert crop[key] == full[key]
    c, f = crop["classification"], full["classification"]
    for key in ("label", "probability", "score", "infection_ml", "lung_slices", "infection_found"):
        assert c[key] == f[key], key
    ran = np.asarray(c["slice_probability"]) != 0
    assert np.array_equal(np.asarray(c["slice_probability"])[ran], np.asarray(f["slice_probability"])[ran])
    assert full["slices_run"] == a.shape[0]
    return full, crop


@pytest.mark.slow
def test_the_lung_slab_gives_the_label_of_every_slice_on_a_phantom():
    from hybrid_ct.data.phantom import make_phantom

    img, _, _ = make_phantom(0, shape=(64, 160, 160))
    full, crop = _compare_paths(img)
    assert crop["slices_run"] < full["slices_run"], "the phantom's slab should leave out slices below the lungs"


@pytest.mark.slow
def test_the_lung_slab_gives_the_label_of_every_slice_on_p001(shared_data):
    from hybrid_ct.imaging.reader import read_image

    path = shared_data / P001
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    _compare_paths(read_image(str(path)))
