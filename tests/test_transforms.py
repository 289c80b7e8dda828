"""hybrid_ct.processing.transforms: the MONAI dictionary chain shared by the predictor, the trainers and the app,
and its inversion back to the input's own geometry (axial, flipped, permuted and oblique directions)."""

import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import Invertd

from hybrid_ct.errors import InputError
from hybrid_ct.imaging.body import body_mask
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.processing.grid import WINDOW_HU, from_model_slices, make_context, window
from hybrid_ct.processing.transforms import label_to_model_slices, to_model_slices
from hybrid_ct.processing.transforms import (LungWindowd, OrientToCanonicald, ToSliceGridd, model_slices, post_transforms,
                                  pre_transforms, run)


def _flipped(img):
    return sitk.Flip(img, [True, False, True])


def _permuted(img):
    return sitk.Flip(sitk.PermuteAxes(img, [2, 0, 1]), [False, True, True])


def _oblique(img):
    out = sitk.Image(img)
    a = np.deg2rad(11.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([1.0, -1.0, -1.0])
    out.SetDirection(tuple(rot.ravel()))
    return out


LAYOUTS = {"axial": lambda img: img, "flipped": _flipped, "permuted": _permuted, "oblique": _oblique}


@pytest.fixture(scope="module")
def square_phantom():
    """Axial grid 32 x 32 with isotropic in-plane spacing: a 32-pixel model grid needs no pad, no resize."""
    img, lab, _ = make_phantom(3, shape=(6, 32, 32), positive=True)
    return img, lab


def _pair(phantom, layout):
    img, lab = phantom
    f = LAYOUTS[layout]
    return f(img), f(lab)


def test_lung_window_is_the_projects_window():
    rng = np.random.default_rng(0)
    hu = np.concatenate([np.arange(-3000, 3001, dtype=np.float32), rng.normal(-500, 600, 100000).astype(np.float32),
                         np.float32(WINDOW_HU)]).reshape(1, 1, -1)
    out = LungWindowd("image")({"image": hu})["image"]
    assert out.dtype == np.float32 or str(out.dtype) == "torch.float32"
    np.testing.assert_array_equal(np.asarray(out), window(hu))  # bit for bit


@pytest.mark.parametrize("layout", ["axial", "flipped", "permuted"])
def test_round_trip_returns_the_input_geometry_exactly(square_phantom, layout):
    img, lab = _pair(square_phantom, layout)
    pre = pre_transforms(32, keys=("image", "label"))
    d = run(pre, {"image": img, "label": lab})
    assert d["image"].shape == (6, 1, 32, 32) and d["label"].shape == (6, 1, 32, 32)
    names = [op["class"] for op in d["label"].applied_operations]
    assert names == ["OrientToCanonicald", "ToSliceGridd"]
    back = Invertd(keys="label", transform=pre, orig_keys="label")(d)["label"]
    lab_arr = sitk.GetArrayFromImage(lab)
    assert tuple(back.shape[1:]) == lab_arr.shape  # the input's own (z, y, x) layout
    np.testing.assert_array_equal(np.asarray(back)[0].astype(np.uint8), lab_arr)
    # the body mask comes back with the same inverse: the same voxels as io.body_mask on the input
    body = Invertd(keys="body", transform=pre, orig_keys="body")(d)["body"]
    np.testing.assert_array_equal(np.asarray(body)[0], body_mask(img))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_through_a_resized_grid(layout):
    """Non-square, anisotropic volume on a bigger grid: shape and layout back exactly, labels nearly."""
    img, lab, _ = make_phantom(4, shape=(5, 40, 56), spacing=(5.0, 3.0, 2.5), positive=True)
    img, lab = LAYOUTS[layout](img), LAYOUTS[layout](lab)
    pre = pre_transforms(48, keys=("image", "label"))
    d = run(pre, {"image": img, "label": lab})
    back = np.asarray(Invertd(keys="label", transform=pre, orig_keys="label")(d)["label"])[0]
    ref = sitk.GetArrayFromImage(lab)
    assert back.shape == ref.shape
    for v in (1, 2):
        a, b = back == v, ref == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    np.testing.assert_array_equal(np.asarray(Invertd(keys="body", transform=pre, orig_keys="body")(d)["body"])[0],
                                  body_mask(img))


def test_post_transforms_invert_probabilities_like_from_model_slices():
    img, _, _ = make_phantom(6, shape=(7, 50, 44), spacing=(4.0, 3.0, 3.5))
    img = _permuted(img)
    pre = pre_transforms(40)
    d = run(pre, {"image": img})
    prob = np.random.default_rng(1).random((7, 2, 40, 40)).astype(np.float32)
    d["pred"] = prob
    out = run(post_transforms(pre), d)
    expected = from_model_slices(prob, make_context(img, 40))
    np.testing.assert_array_equal(np.asarray(out["pred"]), expected)
    assert out["label"].shape == sitk.GetArrayFromImage(img).shape and out["label"].dtype == np.uint8


def test_array_functions_and_training_use_the_same_chain():
    img, lab, _ = make_phantom(8, shape=(6, 45, 60), spacing=(5.0, 3.0, 2.0), positive=True)
    img, lab = _permuted(img), _permuted(lab)
    x, ctx = to_model_slices(img, 64)
    xt, labt = model_slices(img, lab, 64)
    np.testing.assert_array_equal(x, xt)
    np.testing.assert_array_equal(label_to_model_slices(lab, ctx), labt)
    x_only, none = model_slices(img, None, 64)
    np.testing.assert_array_equal(x_only, x)
    assert none is None


def test_input_errors_come_out_as_input_errors():
    img, lab, _ = make_phantom(2, shape=(4, 30, 30))
    with pytest.raises(InputError, match="does not match the image size"):
        model_slices(img, lab[:, :, :3], 32)
    with pytest.raises(InputError, match="3D"):
        model_slices(sitk.Image(5, 5, sitk.sitkFloat32), None, 32)
    with pytest.raises(InputError, match="at least 8"):
        ToSliceGridd("image", 4)


def test_reorientation_happens_once_and_is_invertible():
    chain = pre_transforms(32)
    names = [type(t).__name__ for t in chain.transforms]
    assert names == ["SitkToTensord", "OrientToCanonicald", "BodyMaskd", "StandardiseDensityd", "LungSlabd", "LungWindowd",
                     "ToSliceGridd"]
    assert sum(isinstance(t, OrientToCanonicald) for t in chain.transforms) == 1
    invertible = [type(t).__name__ for t in chain.transforms if hasattr(t, "inverse")]
    assert invertible == ["OrientToCanonicald", "ToSliceGridd"]


def test_the_app_runs_the_predictors_chain_and_lists_none_of_its_own():
    """The infer task lists no transform of its own (a listed copy could only drift from what runs): the
    predictor builds its chain from the served checkpoint's input definition."""
    pytest.importorskip("monailabel")
    import sys
    from pathlib import Path

    app_dir = str(Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct")
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    from lib.infers.hybrid_ct import HybridCTInfer

    for name in ("pre_transforms", "post_transforms", "inverse_transforms"):
        assert not hasattr(HybridCTInfer, name), name
    names = [type(t).__name__ for t in post_transforms(pre_transforms(8)).transforms]
    assert names == ["EnsureTyped", "Invertd", "ProbsToLabeld", "KeepLungComponentsd", "PlausibleLungsd", "LungSidesd"]

