"""The left / right lung split runs once per prediction (issue 30, point 4): the post chain's ``LungSidesd``
computes it, the report's per-side burden reuses it; the numbers are those of a split computed afresh."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.contract import LABELS
from hybrid_ct.processing import sides
from hybrid_ct.processing.burden import infection_burden
from hybrid_ct.processing.sides import left_of, lung_sides, physical_x
from hybrid_ct.processing.transforms import LungSidesd


def _unsided(small_phantom) -> sitk.Image:
    lab = sitk.Cast(small_phantom[1], sitk.sitkUInt8)
    assert (sitk.GetArrayFromImage(lab) == LABELS["infection"]).any()
    return lab


def _fresh_burden(label: sitk.Image) -> dict:
    sides._LAST.clear()
    before = sides.splits_computed
    out = infection_burden(label)
    assert sides.splits_computed == before + 1  # really computed, not reused
    return out


def test_post_chain_then_burden_splits_once(small_phantom):
    lab = _unsided(small_phantom)
    sides._LAST.clear()
    before = sides.splits_computed
    arr = LungSidesd("label")({"label": sitk.GetArrayFromImage(lab), "hu": lab})["label"]
    sided = sitk.GetImageFromArray(arr)
    sided.CopyInformation(lab)
    burden = infection_burden(sided)  # as Predictor._report asks for it
    assert sides.splits_computed == before + 1
    assert burden == _fresh_burden(sided) == _fresh_burden(lab)


def test_a_different_lung_or_geometry_is_split_again():
    lung = np.zeros((4, 10, 20), bool)
    lung[:, 2:8, 1:8] = lung[:, 2:8, 11:19] = True
    other = lung.copy()
    other[:, 2:8, 11:19] = False
    other[:, 2:8, 12:19] = True  # one column less: a different mask
    sides._LAST.clear()
    before = sides.splits_computed
    a = left_of(lung, physical_x(None))
    b = left_of(other, physical_x(None))  # different mask
    c = left_of(lung, physical_x(None, (0, 0, 1)))  # same mask, shifted box: different geometry
    assert sides.splits_computed == before + 3
    d = left_of(lung, physical_x(None, (0, 0, 1)))  # reused (and dropped)
    e = left_of(lung, physical_x(None, (0, 0, 1)))
    assert sides.splits_computed == before + 4
    assert d is c and np.array_equal(e, c) and not c.flags.writeable
    assert a[:, 2:8, 11:19].all() and not a[:, 2:8, 1:8].any()
    assert not b[:, 2:8, 1:8].any()


def test_lung_sides_output_unchanged_by_reuse(small_phantom):
    lab = _unsided(small_phantom)
    arr = sitk.GetArrayFromImage(lab)
    sides._LAST.clear()
    first = lung_sides(arr, lab)
    again = lung_sides(arr, lab)  # reuses the split of the first call
    sides._LAST.clear()
    assert np.array_equal(first, again) and np.array_equal(first, lung_sides(arr, lab))


@pytest.mark.slow
def test_predict_splits_once_with_the_same_burden(small_phantom):
    """The whole Predictor (shipped model) on a phantom: one split, the burden of a fresh split."""
    from hybrid_ct.net.model_files import default_model_path
    from hybrid_ct.predict.predictor import Predictor

    predictor = Predictor.from_checkpoint(default_model_path(), require_chest=False)
    sides._LAST.clear()
    before = sides.splits_computed
    label, report = predictor.predict(small_phantom[0])
    assert (sitk.GetArrayFromImage(label) > 0).any(), "no lung found: the test would compare nothing"
    assert sides.splits_computed == before + 1
    assert report["burden"] == _fresh_burden(label)
