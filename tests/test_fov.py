"""The body's field of view (issue 18, point 3): crop to the body's square box before resizing, and the
exact way back to the input's own grid."""

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.errors import InputError
from hybrid_ct.io import body_mask
from hybrid_ct.model import HybridMultiTaskNet, NetConfig
from hybrid_ct.phantom import make_phantom
from hybrid_ct.preprocess import (BODY_MARGIN_MM, body_box_pad, canon_to_grid, from_model_slices, grid_to_canon,
                                  label_to_model_slices, square_pad, to_model_slices)
from hybrid_ct.transforms import post_transforms, pre_transforms, run


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    """A wide field of view around a smaller body (anisotropic pixels), with a table under the back."""
    return make_phantom(5, shape=(12, 120, 150), spacing=(5.0, 3.5, 3.0), positive=True, table=True)


def test_body_box_is_a_square_around_the_body_plus_the_margin():
    body = np.zeros((3, 100, 120), bool)
    body[1, 30:60, 20:90] = True  # 30 x 70 pixels at 2 x 1 mm: 60 x 70 mm
    top, bottom, left, right = body_box_pad(body, body.shape, (5.0, 2.0, 1.0))
    rows, cols = 100 + top + bottom, 120 + left + right
    assert rows * 2.0 == pytest.approx(cols * 1.0, abs=2.0)  # square in millimetres
    assert cols == pytest.approx(70 + 2 * BODY_MARGIN_MM, abs=1)  # the wider side sets it
    r0, c0 = -top, -left
    assert r0 <= 30 - BODY_MARGIN_MM / 2 and r0 + rows >= 60 + BODY_MARGIN_MM / 2  # body + margin inside
    assert c0 <= 20 - BODY_MARGIN_MM + 1 and c0 + cols >= 90 + BODY_MARGIN_MM - 1
    assert top < 0 and left < 0 and bottom < 0 and right < 0  # a crop on every side here


def test_body_box_falls_back_to_the_square_view():
    shape, spacing = (2, 40, 50), (5.0, 1.0, 1.0)
    square = square_pad(shape, spacing)
    assert body_box_pad(None, shape, spacing) == square
    assert body_box_pad(np.zeros(shape, bool), shape, spacing) == square  # no body
    tiny = np.zeros(shape, bool)
    tiny[0, 20:22, 20:22] = True  # under 5 % of the picture: a failed mask, not a patient
    assert body_box_pad(tiny, shape, spacing) == square
    assert body_box_pad(np.ones(shape, bool), shape, spacing) == square  # the body fills the image


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


def test_body_view_fills_the_grid_with_the_lungs_and_keeps_the_label_aligned(phantom):
    img, lab, _ = phantom
    xs, ctx_s = to_model_slices(img, 64)
    xb, ctx_b = to_model_slices(img, 64, "body")
    assert min(ctx_b.pad) < 0 and ctx_s.pad == square_pad(ctx_s.canon_shape, ctx_s.canon_spacing)
    grid_s, grid_b = label_to_model_slices(lab, ctx_s), label_to_model_slices(lab, ctx_b)
    assert (grid_b > 0).sum() > 1.3 * (grid_s > 0).sum()  # the lungs cover more of the grid
    for k in (1, 2):  # the label lies on the same tissue in both views: aligned with its image
        assert xb[:, 0][grid_b == k].mean() == pytest.approx(xs[:, 0][grid_s == k].mean(), abs=0.03)
    # the body (outside the table) is inside the view: nothing of it is cropped away
    body = body_mask(img)
    back = from_model_slices(np.ones((len(xb), 1, 64, 64), np.float32), ctx_b)[0] > 0.5
    assert back[body].all() and not back.all()


def test_post_transforms_bring_a_body_view_label_back_to_the_input(phantom):
    img, lab, _ = phantom
    pre = pre_transforms(64, fov="body")
    d = run(pre, {"image": img})
    _, ctx = to_model_slices(img, 64, "body")
    grid = label_to_model_slices(lab, ctx)  # the truth on the model grid, as a perfect network would draw it
    d["pred"] = np.stack([grid > 0, grid == 2], 1).astype(np.float32)
    out = run(post_transforms(pre), d)
    truth = sitk.GetArrayFromImage(lab)
    assert out["label"].shape == truth.shape
    assert dice(out["label"] > 0, truth > 0) > 0.95
    assert dice(out["label"] == 2, truth == 2) > 0.8  # small lesions, 64-pixel grid and back


def test_training_and_inference_see_the_same_body_view(phantom):
    from hybrid_ct.transforms import model_slices

    img, lab, _ = phantom
    x_train, lab_train = model_slices(img, lab, 64, "body")
    x_infer = run(pre_transforms(64, fov="body"), {"image": img})["image"].as_tensor().numpy()
    np.testing.assert_array_equal(x_train, x_infer)
    _, ctx = to_model_slices(img, 64, "body")
    np.testing.assert_array_equal(lab_train, label_to_model_slices(lab, ctx))


def test_fov_is_part_of_the_network_config_and_its_checkpoint(tmp_path, phantom):
    from hybrid_ct.checkpoint import load_checkpoint, save_checkpoint
    from hybrid_ct.inference import Predictor

    with pytest.raises(ValueError, match="fov"):
        NetConfig(fov="lungs")
    with pytest.raises(InputError, match="fov"):
        pre_transforms(32, fov="lungs")
    assert NetConfig().fov == "square"  # older checkpoints: the whole image, as they were trained
    cfg = NetConfig(levels=3, base_channels=4, max_channels=8, fc_hidden=8, time_steps=2, in_size=32, fov="body")
    path = tmp_path / "m.pt"
    save_checkpoint(path, HybridMultiTaskNet(cfg))
    model, _ = load_checkpoint(path)
    assert model.cfg.fov == "body"
    img = phantom[0]
    label, report = Predictor(model, require_chest=False).predict(img)
    assert label.GetSize() == img.GetSize()
    outside = from_model_slices(np.ones((12, 1, 32, 32), np.float32), to_model_slices(img, 32, "body")[1])[0] < 0.5
    assert not sitk.GetArrayFromImage(label)[outside].any()  # nothing is drawn outside the body's view
