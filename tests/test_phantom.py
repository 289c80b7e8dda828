"""hybrid_ct.data.phantom: determinism, exact masks, plausible Hounsfield units, datastore layout."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from hybrid_ct.errors import InputError
from hybrid_ct.imaging.chest import check_ct
from hybrid_ct.imaging.reader import read_image, read_label
from hybrid_ct.data.phantom import make_phantom, write_phantom_set

SHAPE = (16, 64, 72)


def _arrays(case):
    img, lab, _ = case
    return sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)


def test_same_seed_same_phantom_different_seed_different():
    a_img, a_lab = _arrays(make_phantom(7, SHAPE))
    b_img, b_lab = _arrays(make_phantom(7, SHAPE))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = _arrays(make_phantom(8, SHAPE))
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab > 0, c_lab > 0)


def test_default_geometry_and_types():
    img, lab, info = make_phantom(0)
    assert img.GetSize() == (192, 192, 48)
    assert img.GetPixelID() == sitk.sitkFloat32 and lab.GetPixelID() == sitk.sitkUInt8
    sx, sy, sz = img.GetSpacing()
    assert sz == pytest.approx(5.0) and sx == pytest.approx(350 / 192) and sy == sx
    assert lab.GetSpacing() == img.GetSpacing() and lab.GetOrigin() == img.GetOrigin()
    assert set(info) >= {"positive", "n_lesions", "burden_pct"}
    check_ct(img, min_slices=3)  # looks like a chest CT in HU to the input checks
    img2, _, _ = make_phantom(0, shape=(10, 40, 50), spacing=(4.0, 2.0, 3.0))
    assert img2.GetSize() == (50, 40, 10) and img2.GetSpacing() == (3.0, 2.0, 4.0)


def test_masks_are_exact(small_phantom, small_negative_phantom):
    pos_img, pos_lab = _arrays(small_phantom)
    neg_img, neg_lab = _arrays(small_negative_phantom)
    assert set(np.unique(pos_lab)) == {0, 1, 2}
    assert set(np.unique(neg_lab)) == {0, 1}
    # same seed, same anatomy: the infection only relabels lung voxels, never anything else
    np.testing.assert_array_equal(pos_lab > 0, neg_lab > 0)
    assert (neg_lab[pos_lab == 2] == 1).all()
    outside = neg_lab == 0
    np.testing.assert_allclose(pos_img[outside], neg_img[outside])
    # infection is denser than the healthy lung it replaced; healthy lung is untouched far from it
    inf = pos_lab == 2
    assert pos_img[inf].mean() > neg_img[inf].mean() + 150
    info = small_phantom[2]
    assert info["positive"] and info["n_lesions"] >= 1
    assert info["burden_pct"] == pytest.approx(100 * inf.sum() / (pos_lab > 0).sum())
    neg_info = small_negative_phantom[2]
    assert not neg_info["positive"] and neg_info["n_lesions"] == 0 and neg_info["burden_pct"] == 0


def test_hounsfield_units_are_plausible():
    img, lab = _arrays(make_phantom(4, positive=False))
    assert np.median(img[lab == 1]) == pytest.approx(-850, abs=60)
    assert np.median(img[0]) == pytest.approx(-1000, abs=30)  # air around the patient (corner slice)
    d, h, w = img.shape
    centre = img[d // 2, h // 2 - 10:h // 2 + 10, w // 2 - 5:w // 2 + 5]
    assert -150 < np.median(centre) < 150  # mediastinum: soft tissue
    assert (img > 350).sum() > 1000  # spine and ribs
    assert (img < -950)[lab == 0].sum() > 0  # air in trachea / outside


def test_lesion_kinds_and_counts_vary():
    infos = [make_phantom(s, SHAPE, positive=True)[2] for s in range(8)]
    assert len({i["n_lesions"] for i in infos}) > 2
    burdens = [i["burden_pct"] for i in infos]
    assert min(burdens) > 0 and max(burdens) > 3 * min(burdens)
    drawn = [make_phantom(s, (4, 32, 32))[2]["positive"] for s in range(30)]
    assert 10 <= sum(drawn) <= 28  # about 2/3 positive when not forced


def test_table_option():
    img, _ = _arrays(make_phantom(1, SHAPE, positive=False, table=True))
    plain, _ = _arrays(make_phantom(1, SHAPE, positive=False))
    diff = img != plain
    assert diff.any() and (img[diff] > plain[diff]).all()


def test_bad_arguments():
    with pytest.raises(InputError, match="shape"):
        make_phantom(0, shape=(10, 10))
    with pytest.raises(InputError, match="spacing"):
        make_phantom(0, shape=(4, 16, 16), spacing=(0, 1, 1))
    with pytest.raises(InputError, match="at least 1"):
        write_phantom_set("/nonexistent", n=0)


def test_write_phantom_set_layout(tmp_path):
    paths = write_phantom_set(tmp_path / "ds", n=6, seed=1, shape=(8, 48, 48))
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"phantom_{i:03d}.nii.gz" for i in range(6)]
    with open(tmp_path / "ds" / "phantoms.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f"phantom_{i:03d}" for i in range(6)]
    assert sum(int(r["positive"]) for r in rows) == 4
    for path, row in zip(paths, rows):
        img = read_image(path)
        lab = read_label(tmp_path / "ds" / "labels" / "final" / f"{row['id']}.nii.gz", img)
        a = sitk.GetArrayViewFromImage(lab)
        assert (a == 2).any() == bool(int(row["positive"]))
        assert float(row["burden_pct"]) == pytest.approx(100 * (a == 2).sum() / max((a > 0).sum(), 1), abs=1e-3)
    again = write_phantom_set(tmp_path / "ds2", n=6, seed=1, shape=(8, 48, 48), with_labels=False)
    assert not (tmp_path / "ds2" / "labels").exists()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(again[2])),
                                  sitk.GetArrayFromImage(read_image(paths[2])))
