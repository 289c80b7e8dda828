"""The lungs' field of view (issue 18, point 3): crop to the square around the lungs before resizing, and
the exact way back to the input's own grid."""

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.errors import InputError
from hybrid_ct.imaging.body import body_mask
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
from hybrid_ct.data.phantom import make_phantom
from hybrid_ct.processing.crop import lung_air_box
from hybrid_ct.processing.grid import (LUNG_MARGIN_MM, box_pad, canon_to_grid, from_model_slices, grid_to_canon, make_context, square_pad, to_canonical)
from hybrid_ct.processing.transforms import label_to_model_slices, to_model_slices
from hybrid_ct.processing.transforms import post_transforms, pre_transforms, run


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    """A wide field of view around the lungs (anisotropic pixels), with a table under the back."""
    return make_phantom(5, shape=(12, 120, 150), spacing=(5.0, 3.5, 3.0), positive=True, table=True)


def test_lung_box_is_a_square_around_the_box_plus_the_margin():
    shape, spacing = (3, 100, 120), (5.0, 2.0, 1.0)
    top, bottom, left, right = box_pad((30, 60, 20, 90), shape, spacing)  # 60 x 70 mm of lungs
    rows, cols = 100 + top + bottom, 120 + left + right
    assert rows * 2.0 == pytest.approx(cols * 1.0, abs=2.0)  # square in millimetres
    assert cols == pytest.approx(70 + 2 * LUNG_MARGIN_MM, abs=1)  # the wider side sets it
    r0, c0 = -top, -left
    assert r0 <= 30 - LUNG_MARGIN_MM / 2 and r0 + rows >= 60 + LUNG_MARGIN_MM / 2  # box + margin inside
    assert c0 <= 20 - LUNG_MARGIN_MM + 1 and c0 + cols >= 90 + LUNG_MARGIN_MM - 1


def test_lung_box_falls_back_to_the_square_view():
    shape, spacing = (2, 40, 50), (5.0, 1.0, 1.0)
    square = square_pad(shape, spacing)
    assert box_pad(None, shape, spacing) == square  # no air found
    assert box_pad((20, 22, 20, 22), shape, spacing) == square  # under 2 % of the image: not a pair of lungs
    assert box_pad((0, 40, 0, 50), shape, spacing) == square  # the lungs fill the image


def test_lung_air_box_on_a_volume_and_not_on_a_picture(phantom):
    img, lab, _ = phantom
    ctx = make_context(img, 64)
    hu = to_canonical(sitk.GetArrayFromImage(img), ctx.perm, ctx.flips)
    body = to_canonical(body_mask(img), ctx.perm, ctx.flips)
    lung = to_canonical(sitk.GetArrayFromImage(lab), ctx.perm, ctx.flips) > 0
    y0, y1, x0, x1 = lung_air_box(hu, body, ctx.canon_spacing)
    ys, xs = np.flatnonzero(lung.any(axis=(0, 2))), np.flatnonzero(lung.any(axis=(0, 1)))
    k = 2  # the air is found on a grid of about 4 mm: within a couple of its pixels of the lungs
    assert ys[0] - k * 2 <= y0 <= ys[0] + k * 2 and ys[-1] - k * 2 <= y1 <= ys[-1] + 1 + k * 2
    assert x0 <= xs[0] + k * 2 and x1 >= xs[-1] + 1 - k * 2
    assert lung_air_box(hu[:1], body[:1], ctx.canon_spacing) is None  # one slice: the whole picture
    # a white-out: one lung dense on every slice -> the box still spans both sides (mirrored)
    yy, xx = np.mgrid[:80, :100]
    body2 = np.broadcast_to(((yy - 40) / 35) ** 2 + ((xx - 50) / 45) ** 2 <= 1, (10, 80, 100))
    right = ((yy - 40) / 20) ** 2 + ((xx - 30) / 12) ** 2 <= 1
    left = ((yy - 40) / 20) ** 2 + ((xx - 70) / 12) ** 2 <= 1
    vol = np.where(body2, 40.0, -1000.0)
    vol[:, right | left] = -850.0
    both = lung_air_box(vol, body2, (5.0, 1.0, 1.0))
    vol[:, left] = 40.0
    one = lung_air_box(vol, body2, (5.0, 1.0, 1.0))
    assert both[2] <= 22 and both[3] >= 82 and one[2] <= 22 and one[3] >= 80  # lungs at 18..82, 4 mm grid


def test_crop_and_its_inverse_put_every_pixel_back_inside_the_box():
    rng = np.random.default_rng(0)
    canon = rng.integers(0, 3, (4, 60, 80)).astype(np.float32)
    pad = (-10, -6, -20, -12)  # rows 10..54, columns 20..68 (44 x 48) -> made square by the caller
    size = 48
    grid = canon_to_grid(canon, pad, size, fill=0.0, mode="nearest")
    assert grid.shape == (4, 1, size, size)
    back = grid_to_canon(grid, pad, canon.shape, size, mode="nearest")[0]
    inside = (slice(None), slice(10, 54), slice(20, 68))
    assert (back[inside] == canon[inside]).mean() > 0.9  # 44 x 48 -> 48 x 48 -> back: nearest, almost exact
    outside = np.ones(canon.shape, bool)
    outside[inside] = False
    assert not back[outside].any()  # outside the box: background
    # mixed: crop rows, pad columns
    pad2 = (-10, -10, 5, 5)
    g2 = canon_to_grid(canon, pad2, 40, fill=0.0, mode="nearest")
    np.testing.assert_array_equal(g2[:, 0, :, :2], 0)  # the padded columns are the fill value
    b2 = grid_to_canon(g2, pad2, canon.shape, 40, mode="nearest")[0]
    assert b2.shape == canon.shape and not b2[:, :10].any() and not b2[:, 50:].any()


def test_lungs_view_fills_the_grid_with_the_lungs_and_keeps_the_label_aligned(phantom):
    img, lab, _ = phantom
    xs, ctx_s = to_model_slices(img, 64)
    xb, ctx_b = to_model_slices(img, 64, "lungs")
    assert min(ctx_b.pad) < 0 and ctx_s.pad == square_pad(ctx_s.canon_shape, ctx_s.canon_spacing)
    grid_s, grid_b = label_to_model_slices(lab, ctx_s), label_to_model_slices(lab, ctx_b)
    assert (grid_b > 0).sum() > 1.3 * (grid_s > 0).sum()  # the lungs cover more of the grid
    for k in (1, 2):  # the label lies on the same tissue in both views: aligned with its image
        assert xb[:, 0][grid_b == k].mean() == pytest.approx(xs[:, 0][grid_s == k].mean(), abs=0.03)
    # every lung voxel is inside the view: nothing of the lungs is cropped away
    back = from_model_slices(np.ones((len(xb), 1, 64, 64), np.float32), ctx_b)[0] > 0.5
    assert back[sitk.GetArrayFromImage(lab) > 0].all() and not back.all()


def test_post_transforms_bring_a_lungs_view_label_back_to_the_input(phantom):
    img, lab, _ = phantom
    pre = pre_transforms(64, fov="lungs")
    d = run(pre, {"image": img})
    _, ctx = to_model_slices(img, 64, "lungs")
    grid = label_to_model_slices(lab, ctx)  # the truth on the model grid, as a perfect network would draw it
    d["pred"] = np.stack([grid > 0, grid == 2], 1).astype(np.float32)
    out = run(post_transforms(pre), d)
    truth = sitk.GetArrayFromImage(lab)
    assert out["label"].shape == truth.shape
    assert dice(out["label"] > 0, truth > 0) > 0.95
    assert dice(out["label"] == 2, truth == 2) > 0.8  # small lesions, 64-pixel grid and back


def test_training_and_inference_see_the_same_lungs_view(phantom):
    from hybrid_ct.processing.transforms import model_slices

    img, lab, _ = phantom
    x_train, lab_train = model_slices(img, lab, 64, "lungs")
    x_infer = run(pre_transforms(64, fov="lungs"), {"image": img})["image"].as_tensor().numpy()
    np.testing.assert_array_equal(x_train, x_infer)
    _, ctx = to_model_slices(img, 64, "lungs")
    np.testing.assert_array_equal(lab_train, label_to_model_slices(lab, ctx))


def test_fov_is_part_of_the_network_config_and_its_checkpoint(tmp_path, phantom):
    from hybrid_ct.net.checkpoint import load_checkpoint, save_checkpoint
    from hybrid_ct.predict.predictor import Predictor

    with pytest.raises(ValueError, match="fov"):
        NetConfig(fov="chest")
    with pytest.raises(InputError, match="fov"):
        pre_transforms(32, fov="chest")
    assert NetConfig().fov == "square"  # older checkpoints: the whole image, as they were trained
    cfg = NetConfig(levels=3, base_channels=4, max_channels=8, fc_hidden=8, time_steps=2, in_size=32, fov="lungs")
    path = tmp_path / "m.pt"
    save_checkpoint(path, HybridMultiTaskNet(cfg))
    model, _ = load_checkpoint(path)
    assert model.cfg.fov == "lungs"
    img = phantom[0]
    label, report = Predictor(model, require_chest=False).predict(img)
    assert label.GetSize() == img.GetSize()
    outside = from_model_slices(np.ones((12, 1, 32, 32), np.float32), to_model_slices(img, 32, "lungs")[1])[0] < 0.5
    assert not sitk.GetArrayFromImage(label)[outside].any()  # nothing is drawn outside the lungs' view
