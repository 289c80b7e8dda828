"""hybrid_ct.processing.burden: infection burden per lung on hand-made label maps, and the MosMed grade."""

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.errors import InputError
from hybrid_ct.processing.burden import infection_burden, severity_grade


def two_lungs():
    """Two separate 'lungs' of 6*6*4 = 144 voxels; the one at high x (patient left in LPS) is half infected."""
    a = np.zeros((4, 10, 20), np.uint8)
    a[:, 2:8, 2:8] = 1  # low x: patient right
    a[:, 2:8, 12:18] = 1  # high x: patient left
    a[:, 2:5, 12:18] = 2  # 72 of 144 voxels
    a[:, 7, 2:5] = 2  # 12 of 144 on the right
    return a


def test_burden_and_sides_by_hand():
    r = infection_burden(sitk.GetImageFromArray(two_lungs()))
    assert r["total_pct"] == pytest.approx(100 * 84 / 288)
    assert r["left_pct"] == pytest.approx(50.0)
    assert r["right_pct"] == pytest.approx(100 * 12 / 144)
    assert infection_burden(two_lungs()) == r  # a plain array: x index towards the patient's left


def test_sides_follow_physical_coordinates():
    img = sitk.GetImageFromArray(two_lungs())
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))  # x index now runs towards the patient's right
    r = infection_burden(img)
    assert r["right_pct"] == pytest.approx(50.0)
    assert r["left_pct"] == pytest.approx(100 * 12 / 144)
    # axes permuted in storage: the same physical patient gives the same answer
    permuted = sitk.PermuteAxes(sitk.GetImageFromArray(two_lungs()), [2, 0, 1])
    assert infection_burden(permuted) == pytest.approx(infection_burden(two_lungs()))


def test_touching_lungs_split_at_the_midline():
    a = np.zeros((2, 6, 20), np.uint8)
    a[:, 1:5, 2:18] = 1  # one component spanning x 2..17, midline at 9.5
    a[:, 1:5, 14:18] = 2  # 32 voxels, all on the left half (x > 9.5)
    r = infection_burden(a)
    assert r["total_pct"] == pytest.approx(100 * 32 / 128)
    assert r["left_pct"] == pytest.approx(50.0)  # 32 of the 64 voxels at x 10..17
    assert r["right_pct"] == 0.0


def test_small_pieces_go_to_their_side():
    a = two_lungs()
    a[:, 9, 19] = 2  # a stray infected piece far on the left, not connected to either lung
    r = infection_burden(a)
    assert r["left_pct"] == pytest.approx(100 * 76 / 148)
    assert r["right_pct"] == pytest.approx(100 * 12 / 144)


def test_no_lung_and_bad_values():
    assert infection_burden(np.zeros((2, 4, 4), np.uint8)) == {"total_pct": 0.0, "left_pct": 0.0, "right_pct": 0.0}
    with pytest.raises(InputError, match="outside"):
        infection_burden(np.full((2, 4, 4), 5, np.uint8))
    with pytest.raises(InputError, match="not a label map"):
        infection_burden([[0, 1]])


def test_phantom_burden_matches_its_info(small_phantom):
    _, lab, info = small_phantom
    r = infection_burden(lab)
    assert r["total_pct"] == pytest.approx(info["burden_pct"])
    assert r["left_pct"] > 0 or r["right_pct"] > 0


@pytest.mark.parametrize("pct,grade", [
    (0, "CT-0"), (0.01, "CT-1"), (24.99, "CT-1"), (25, "CT-2"), (49.9, "CT-2"),
    (50, "CT-3"), (75, "CT-3"), (75.1, "CT-4"), (100, "CT-4"),
])
def test_grades(pct, grade):
    assert severity_grade(pct) == grade


@pytest.mark.parametrize("bad", [-1, 100.5, float("nan"), "a lot", None])
def test_grade_refuses_non_percentages(bad):
    with pytest.raises(InputError, match="percentage"):
        severity_grade(bad)
