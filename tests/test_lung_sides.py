"""The derived head ``lung_sides`` (contract.json "heads"): right / left lung in the label map, assigned
geometrically after the network, consistent with the per-side burden, and trained as plain lung."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.contract import HEADS, LABELS, PREDICTED, SIDES, head_targets
from hybrid_ct.data.slice_store import slices_from_arrays
from hybrid_ct.processing.burden import infection_burden
from hybrid_ct.processing.density import lung_density
from hybrid_ct.processing.sides import lung_sides
from hybrid_ct.processing.transforms import LungSidesd, post_transforms, pre_transforms

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct"
RIGHT, LEFT, LUNG, INF = SIDES["right"], SIDES["left"], LABELS["lung"], LABELS["infection"]


def merged(arr: np.ndarray) -> np.ndarray:
    return np.where(np.isin(arr, (RIGHT, LEFT)), LUNG, arr)


def _physical_x(img: sitk.Image, mask: np.ndarray) -> float:
    """Mean physical x (LPS: + is the patient's left) of the voxels of ``mask`` ([z, y, x] of ``img``)."""
    idx = np.argwhere(mask)[:, ::-1].astype(float)  # (x, y, z) indices
    return float(np.mean([img.TransformContinuousIndexToPhysicalPoint(p)[0] for p in idx[:: max(1, len(idx) // 500)]]))


@pytest.fixture(scope="module")
def phantom_label(small_phantom):
    _, lab, _ = small_phantom
    return sitk.Cast(lab, sitk.sitkUInt8)


def test_sides_split_only_the_lung_and_follow_the_patient(phantom_label):
    arr = sitk.GetArrayFromImage(phantom_label)
    sided = lung_sides(arr, phantom_label)
    assert set(np.unique(sided).tolist()) == {0, INF, RIGHT, LEFT}  # no lung left without a side
    assert np.array_equal(merged(sided), arr)  # the split changes nothing else
    assert _physical_x(phantom_label, sided == LEFT) > _physical_x(phantom_label, sided == RIGHT)
    # the same patient stored with the x axis the other way round: the same voxels get the same sides
    flipped = sitk.DICOMOrient(phantom_label, "RPS")
    assert flipped.GetDirection() != phantom_label.GetDirection()
    sided_f = sitk.GetImageFromArray(lung_sides(sitk.GetArrayFromImage(flipped), flipped))
    sided_f.CopyInformation(flipped)
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(sided_f, "LPS"))
    assert np.array_equal(back, lung_sides(sitk.GetArrayFromImage(sitk.DICOMOrient(phantom_label, "LPS")),
                                           sitk.DICOMOrient(phantom_label, "LPS")))
    # a map that already has its sides is left as it is
    assert lung_sides(sided, phantom_label) is sided


def test_the_post_chain_ends_with_the_derived_head(phantom_label):
    chain = post_transforms(pre_transforms(64))
    assert type(chain.transforms[-1]) is LungSidesd and HEADS["lung_sides"]["kind"] == "derived"
    arr = sitk.GetArrayFromImage(phantom_label)
    out = LungSidesd("label")({"label": arr, "hu": phantom_label})["label"]
    assert np.array_equal(out, lung_sides(arr, phantom_label))
    assert set(PREDICTED.values()) == {RIGHT, LEFT, INF}  # what the report's label_names lists


def test_burden_per_side_matches_the_sided_labels():
    lab = np.zeros((6, 20, 30), np.uint8)
    lab[:, 4:16, 2:12] = LUNG  # the patient's right: low x index
    lab[:, 4:16, 17:28] = LUNG
    lab[1:4, 6:10, 4:9] = INF  # 60 infected voxels, all in the right lung
    sided = lung_sides(lab)
    r = infection_burden(sided)
    n_inf = int((sided == INF).sum())
    assert r["right_pct"] == pytest.approx(100 * n_inf / (n_inf + int((sided == RIGHT).sum())))
    assert r["left_pct"] == 0.0 and int((sided == LEFT).sum()) == 6 * 12 * 11
    assert r == infection_burden(lab)  # the same numbers before and after the split


def test_burden_and_density_are_unchanged_by_the_split(small_phantom, phantom_label):
    img = small_phantom[0]
    arr = sitk.GetArrayFromImage(phantom_label)
    sided = sitk.GetImageFromArray(lung_sides(arr, phantom_label))
    sided.CopyInformation(phantom_label)
    assert infection_burden(sided) == infection_burden(phantom_label)
    hu = sitk.GetArrayFromImage(img)
    assert lung_density(hu, sitk.GetArrayFromImage(sided)) == lung_density(hu, arr)
    assert lung_density(hu, arr)["median_hu"] is not None


def test_sided_and_unsided_labels_train_the_same_targets(phantom_label):
    arr = sitk.GetArrayFromImage(phantom_label)
    sided = lung_sides(arr, phantom_label)
    a, b = head_targets(arr), head_targets(sided)
    assert all(np.array_equal(a[h], b[h]) for h in a) and np.array_equal(a["lung"], arr > 0)
    x = np.zeros((len(arr), 1) + arr.shape[1:], np.float32)
    s_old, s_new = slices_from_arrays(x, arr, "g"), slices_from_arrays(x, sided, "g")
    assert np.array_equal(s_old.lung, s_new.lung) and np.array_equal(s_old.infection, s_new.infection)
    assert np.array_equal(s_old.cls, s_new.cls)


def test_app_stores_corrections_of_either_kind_by_name(small_phantom, phantom_label, tmp_path):
    """A correction with sided segments (any values, names the contract knows) and one from a client before the
    sides ("lung" 1, "infection" 2) are both accepted; both train the lung head on the same voxels."""
    pytest.importorskip("monailabel")
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.validation import canonicalise_label

    img = small_phantom[0]
    image_path = tmp_path / "image.nii.gz"
    sitk.WriteImage(img, str(image_path))
    arr = sitk.GetArrayFromImage(phantom_label)
    sided = lung_sides(arr, phantom_label)
    sent = np.zeros_like(sided)
    sent[sided == RIGHT], sent[sided == LEFT], sent[sided == INF] = 7, 8, 9
    paths = {}
    for name, a in (("sided", sent), ("old", arr)):
        im = sitk.GetImageFromArray(a)
        im.CopyInformation(img)
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(im, paths[name])
    out, info, warnings = canonicalise_label(paths["sided"], str(image_path), [
        {"name": "Right lung", "idx": 7}, {"name": "lung_left", "idx": 8}, {"name": "GGO", "idx": 9}])
    assert np.array_equal(sitk.GetArrayFromImage(out), sided) and not warnings
    assert {d["name"]: d["idx"] for d in info} == {"lung": LUNG, "right_lung": RIGHT, "left_lung": LEFT,
                                                     "infection": INF}
    old, _, _ = canonicalise_label(paths["old"], str(image_path), [{"name": "lung", "idx": 1},
                                                                   {"name": "infection", "idx": 2}])
    assert np.array_equal(sitk.GetArrayFromImage(old), arr)  # kept as lung without a side
    t_new, t_old = head_targets(sitk.GetArrayFromImage(out)), head_targets(sitk.GetArrayFromImage(old))
    assert all(np.array_equal(t_new[h], t_old[h]) for h in t_new)
    # no label_info: the contract's own values are accepted as they are, others refused
    same, _, _ = canonicalise_label(paths["old"], str(image_path))
    assert np.array_equal(sitk.GetArrayFromImage(same), arr)
