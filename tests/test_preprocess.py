"""hybrid_ct.processing.grid: the lung window, model slices, and the exact way back to the original grid."""

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.errors import InputError
from hybrid_ct.imaging.reader import read_image
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.processing.grid import WINDOW_HU, array_to_image, from_model_slices, window
from hybrid_ct.processing.transforms import label_to_model_slices, to_model_slices

BODY_HU = -500.0


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    """Non-square in-plane size, anisotropic spacing, identity direction."""
    return make_phantom(11, shape=(10, 70, 96), spacing=(6.0, 3.5, 2.5), positive=True)


def _stored_differently(img):
    """The same patient in physical space, stored with permuted and flipped axes."""
    out = sitk.Flip(sitk.PermuteAxes(img, [2, 0, 1]), [True, False, True])
    assert out.GetDirection() != img.GetDirection()
    return out


def test_window():
    assert WINDOW_HU == (-1350.0, 150.0)
    w = window(np.array([-3000, -1350, -600, 150, 2000]))
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [0, 0, 0.5, 1, 1], atol=1e-6)


def test_model_slices_shape_range_and_padding(phantom):
    img, _, _ = phantom
    x, ctx = to_model_slices(img, size=64)
    assert x.shape == (10, 1, 64, 64) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1
    # 70 x 3.5 mm = 245 mm tall, 96 x 2.5 mm = 240 mm wide: the width is padded, not the height
    assert ctx.pad[0] == ctx.pad[1] == 0 and ctx.pad[2] + ctx.pad[3] == 2
    wide = sitk.GetImageFromArray(np.full((3, 20, 80), -1000.0, np.float32))  # 20 x 80 mm
    xw, ctxw = to_model_slices(wide, size=64)
    assert ctxw.pad == (30, 30, 0, 0)
    assert (xw[:, 0, :14] == 0).all() and (xw[:, 0, -14:] == 0).all()  # the window minimum
    np.testing.assert_allclose(xw[:, 0, 27:37], window(-1000), atol=1e-5)


def test_reorientation_is_canonical(phantom):
    img, _, _ = phantom
    x, _ = to_model_slices(img, size=64)
    y, ctx = to_model_slices(_stored_differently(img), size=64)
    assert ctx.perm != (0, 1, 2) and ctx.flips
    np.testing.assert_allclose(x, y, atol=1e-5)  # the model sees the same axial slices


def test_perfect_model_round_trip(phantom):
    img = _stored_differently(phantom[0])
    x, ctx = to_model_slices(img, size=128)
    model_mask = (x > window(BODY_HU)).astype(np.float32)  # a "perfect model" working in model space
    prob = np.concatenate([model_mask, 1 - model_mask], axis=1)  # [D, 2, S, S]
    back = from_model_slices(prob, ctx)
    direct = sitk.GetArrayFromImage(img) > BODY_HU
    assert back.shape == (2,) + direct.shape and back.dtype == np.float32
    assert dice(back[0] > 0.5, direct) > 0.98
    assert dice(back[1] > 0.5, ~direct) > 0.98
    out = array_to_image((back[0] > 0.5).astype(np.uint8), img)
    assert out.GetSpacing() == img.GetSpacing()
    assert out.GetOrigin() == img.GetOrigin()
    assert out.GetDirection() == img.GetDirection()


def test_labels_follow_the_image(phantom):
    img, lab, _ = phantom
    img2, lab2 = _stored_differently(img), _stored_differently(lab)
    x, ctx = to_model_slices(img2, size=128)
    y = label_to_model_slices(lab2, ctx)
    assert y.shape == (10, 128, 128) and y.dtype == np.uint8
    assert set(np.unique(y)) == {0, 1, 2}
    np.testing.assert_array_equal(y, label_to_model_slices(lab, 128))  # same with or without a ctx
    lung_x = x[:, 0][y > 0]
    assert np.median(lung_x) < window(-700)  # the labelled lung is dark on the image
    onehot = np.stack([y == k for k in range(3)], axis=1).astype(np.float32)
    back = from_model_slices(onehot, ctx).argmax(0)
    orig = sitk.GetArrayFromImage(lab2)
    assert dice(back > 0, orig > 0) > 0.95
    assert dice(back == 2, orig == 2) > 0.8


def test_real_volume_with_flipped_axis(shared_data):
    """lung3d_imlab stores y flipped (direction diag(1, -1, 1)); its lung mask must still line up."""
    img = read_image(shared_data / "lung3d_imlab" / "id001_image_hu.nii.gz")
    mask = sitk.ReadImage(str(shared_data / "lung3d_imlab" / "id001_lungmask.nii.gz"))
    x, ctx = to_model_slices(img, size=128)
    assert x.shape == (64, 1, 128, 128) and ctx.flips
    y = label_to_model_slices(mask, ctx)
    assert np.median(x[:, 0][y == 1]) < window(-600)
    rows = np.nonzero(y.any(axis=(0, 2)))[0]
    bone = (x[:, 0] >= 0.999).sum(axis=(0, 2))  # >= 150 HU, the top of the window
    # LPS rows run anterior -> posterior: the spine (bone) lies behind the lungs' centre
    assert np.average(np.arange(128), weights=bone) > rows.mean()


def test_shape_errors(phantom):
    img, _, _ = phantom
    _, ctx = to_model_slices(img, size=32)
    with pytest.raises(InputError, match="model output shape"):
        from_model_slices(np.zeros((9, 1, 32, 32)), ctx)
    with pytest.raises(InputError, match="does not match the reference"):
        array_to_image(np.zeros((3, 3, 3)), img)
    with pytest.raises(InputError, match="label size"):
        label_to_model_slices(sitk.Image(5, 5, 5, sitk.sitkUInt8), ctx)
    with pytest.raises(InputError, match="3D"):
        to_model_slices(sitk.Image(5, 5, sitk.sitkFloat32))
