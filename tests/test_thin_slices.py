"""The network on every k-th slice of a thin series (``Predictor(z_step_mm=...)``): which slices run, how
the others are filled, and that the default runs every slice, its outputs unchanged."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from hybrid_ct.predict.predictor import Predictor, SliceOutputs, thin_slices


def test_thin_slices_keep_both_ends_and_never_thicken_a_series():
    assert thin_slices(10, 1.0, 5.0).tolist() == [0, 5, 9]
    assert thin_slices(11, 1.25, 2.5).tolist() == [0, 2, 4, 6, 8, 10]
    assert thin_slices(10, 2.0, None).tolist() == list(range(10))
    assert thin_slices(10, 2.0, 3.0).tolist() == list(range(10))  # a 2 mm series is not thinned to 3 mm
    assert thin_slices(2, 0.5, 5.0).tolist() == [0, 1]


def test_filled_interpolates_probabilities_and_takes_the_nearest_class():
    n, idx = 9, np.array([0, 4, 8])
    ramp = np.arange(n, dtype=np.float32)
    full = SliceOutputs(ramp[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32),
                        np.zeros((n, 1, 2, 2), np.float32), ramp / 10, (ramp > 3).astype(np.int64),
                        np.stack([ramp, -ramp], 1))
    part = SliceOutputs(full.lung[idx], full.infection[idx], full.positive_prob[idx], full.predicted[idx],
                        full.rates[idx])
    got = part.filled(idx, n)
    np.testing.assert_allclose(got.lung, full.lung, atol=1e-6)  # linear data come back exactly
    np.testing.assert_allclose(got.positive_prob, full.positive_prob, atol=1e-6)
    np.testing.assert_allclose(got.rates, full.rates, atol=1e-6)
    assert got.predicted.dtype == np.int64
    assert got.predicted.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]  # nearest kept slice (0.5 rounds to even)
    assert got.ran is None


def test_default_runs_every_slice_and_a_step_runs_fewer(model_path, small_phantom):
    image = small_phantom[0]
    thin = sitk.Image(image)
    thin.SetSpacing(image.GetSpacing()[:2] + (1.0,))  # the same voxels as a 1 mm series
    plain = Predictor.from_checkpoint(model_path, require_chest=False, crop=False)
    step = Predictor.from_checkpoint(model_path, require_chest=False, crop=False, z_step_mm=4.0)
    la, ra = plain.predict(thin)
    lb, rb = step.predict(thin)
    n = thin.GetSize()[2]
    assert ra["slices_run"] == n and ra["slices_interpolated"] == 0
    assert rb["slices_run"] == len(thin_slices(n, 1.0, 4.0)) < n
    assert rb["slices_run"] + rb["slices_interpolated"] == n
    assert rb["energy"]["e_hybrid_uj"] < ra["energy"]["e_hybrid_uj"]  # the meter counts the slices that ran
    wide = Predictor.from_checkpoint(model_path, require_chest=False, crop=False, z_step_mm=0.5)
    lc, _ = wide.predict(thin)  # a step below the slice spacing: every slice, the same label
    assert np.array_equal(sitk.GetArrayViewFromImage(lc), sitk.GetArrayViewFromImage(la))
