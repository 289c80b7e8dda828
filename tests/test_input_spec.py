"""The checkpoint carries its input definition: HU window, lung-box margin and body threshold are NetConfig
fields, saved and read back; a checkpoint saved before they existed runs exactly as before; inference and
the training data both build the network's input from them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_ct.imaging.calibration import EXPORT_WINDOW_HU
from hybrid_ct.net.checkpoint import load_checkpoint, save_checkpoint
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
from hybrid_ct.predict.predictor import Predictor
from hybrid_ct.processing.grid import LUNG_MARGIN_MM, WINDOW_HU
from hybrid_ct.processing.transforms import model_slices, to_model_slices

TINY = dict(levels=3, base_channels=4, max_channels=16, time_steps=2, fc_hidden=16, cls_pool=2, in_size=64)


def test_defaults_are_the_input_every_model_so_far_was_built_with():
    cfg = NetConfig()
    assert cfg.window_hu == WINDOW_HU == EXPORT_WINDOW_HU  # the same numbers, two names: network and 8-bit export
    assert cfg.lung_margin_mm == LUNG_MARGIN_MM
    assert cfg.input_spec() == {"fov": "square", "window_hu": WINDOW_HU, "margin_mm": LUNG_MARGIN_MM, "body_hu": -500.0}


def test_input_definition_round_trips_through_a_checkpoint(tmp_path):
    cfg = NetConfig(**TINY, window_hu=(-1200, 200), lung_margin_mm=12.5, body_hu=-450, fov="lungs")
    save_checkpoint(tmp_path / "m.pt", HybridMultiTaskNet(cfg))
    model, _ = load_checkpoint(tmp_path / "m.pt")
    assert model.cfg.window_hu == (-1200.0, 200.0)
    assert (model.cfg.lung_margin_mm, model.cfg.body_hu, model.cfg.fov) == (12.5, -450.0, "lungs")


@pytest.mark.parametrize("bad", [dict(window_hu=(100, -100)), dict(window_hu=(1,)), dict(lung_margin_mm=-1)])
def test_a_broken_input_definition_is_refused(bad):
    with pytest.raises(ValueError):
        NetConfig(**TINY, **bad)


def test_an_old_checkpoint_without_the_fields_runs_exactly_as_today(tmp_path, small_phantom):
    torch.manual_seed(0)
    model = HybridMultiTaskNet(NetConfig(**TINY))
    save_checkpoint(tmp_path / "new.pt", model, {"version": "v"})
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    for key in ("window_hu", "lung_margin_mm", "body_hu"):  # a checkpoint from before these fields
        payload["config"].pop(key)
    torch.save(payload, tmp_path / "old.pt")
    image = small_phantom[0]
    outs = []
    for name in ("old.pt", "new.pt"):
        label, report = Predictor.from_checkpoint(tmp_path / name, require_chest=False).predict(image)
        outs.append((label, report))
    import SimpleITK as sitk

    assert np.array_equal(sitk.GetArrayFromImage(outs[0][0]), sitk.GetArrayFromImage(outs[1][0]))
    assert outs[0][1]["classification"] == outs[1][1]["classification"]


def test_the_predictor_feeds_the_network_with_its_own_window(small_phantom):
    """Two networks that differ only in their stored window see different inputs from the same scan."""
    seen = {}

    class Spy(Predictor):
        def run_slices(self, x, meter=None):
            seen.setdefault(self.model.cfg.window_hu, x.copy())
            return super().run_slices(x, meter)

    torch.manual_seed(0)
    for window in (WINDOW_HU, (-1000.0, 0.0)):
        Spy(HybridMultiTaskNet(NetConfig(**TINY, window_hu=window)), require_chest=False).predict(small_phantom[0])
    a, b = seen[WINDOW_HU], seen[(-1000.0, 0.0)]
    assert a.shape == b.shape and not np.allclose(a, b)
    # the narrower window saturates soft tissue: more pixels at 1.0
    assert (b >= 1.0).mean() > (a >= 1.0).mean()


def test_training_slices_follow_the_network_input_definition(small_phantom):
    image, label, _ = small_phantom
    spec = NetConfig(**TINY, window_hu=(-1000.0, 0.0)).input_spec()
    x_default, lab_default = model_slices(image, label, 64)
    x_spec, lab_spec = model_slices(image, label, 64, spec)
    assert np.array_equal(lab_default, lab_spec)  # the geometry is the same ...
    assert not np.allclose(x_default, x_spec)  # ... the intensities follow the window
    x_whole, _ = to_model_slices(image, 64, spec)
    assert np.array_equal(x_whole, x_spec)
