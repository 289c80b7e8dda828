"""Loaders of the real data in ../shared/data (read in place, skipped when absent) and the split."""
import numpy as np
import pytest

from hybrid_ct.data.manifest import DATA_ENV, canonical_group, combine, data_root, read_slice_labels, split_sets, val_groups_for
from hybrid_ct.data.sources import _cls2d_orientation, load_cls2d, load_imlab, load_majun, load_medseg, load_phantoms, load_sources, picture_to_display_image
from hybrid_ct.data.weak_masks import weak_lung_mask
from hybrid_ct.train.metrics import dice
from hybrid_ct.errors import InputError
from hybrid_ct.data.slice_store import MISSING

S = 64


def _bbox_hw(mask):
    ys, xs = np.nonzero(mask)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def _known(arr):
    return np.array([a[0, 0] != MISSING for a in arr])


def test_canonical_group_merges_majun_aliases():
    assert canonical_group("coronacases_org_001") == "majun20_coronacases_001"
    assert canonical_group("coronacases_001_image_slice_98.npy") == "majun20_coronacases_001"
    assert canonical_group("radiopaedia-14") == canonical_group("radiopaedia_14_85914_0") == "majun20_radiopaedia_14"
    assert canonical_group("ucsd_covid_Patient 179") == "ucsd_covid_Patient 179"


def test_data_root_env_and_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    with pytest.raises(InputError, match="MANIFEST.csv"):
        load_majun(None, S)


def test_weak_lung_mask_on_a_synthetic_slice():
    yy, xx = np.mgrid[:128, :128]
    img = np.full((128, 128), 0.2, np.float32)  # air around the patient
    body = ((yy - 64) / 50) ** 2 + ((xx - 64) / 60) ** 2 <= 1
    img[body] = 0.9
    lungs = (((yy - 64) / 30) ** 2 + ((xx - 40) / 15) ** 2 <= 1) | (((yy - 64) / 30) ** 2 + ((xx - 88) / 15) ** 2 <= 1)
    img[lungs] = 0.33
    img[60:64, 36:40] = 0.9  # a vessel: must be inside the mask (hole filling)
    m = weak_lung_mask(img, clear_border=True)
    assert dice(m, lungs) > 0.9
    assert m[61, 37]
    assert not m[2, 2]  # outside air dropped


def test_majun_slices_transposed_back_and_lungs_merged(shared_data):
    raw = np.load(shared_data / "lung2d_majun" / "coronacases_001_masks_slice_110.npy")
    h, w = _bbox_hw(raw > 0)
    assert h > w  # stored transposed: the two lungs lie one above the other
    s = load_majun(shared_data, S)
    sl = s.slices
    assert sl.images.shape == (4, S, S) and sl.images.dtype == np.uint8
    assert set(np.unique(sl.lung)) <= {0, 1}  # 1 / 2 (two lungs) -> lung 1
    assert not _known(sl.infection).any() and (sl.cls == -1).all()
    for m in sl.lung:
        h, w = _bbox_hw(m == 1)
        assert w > h  # display orientation: lungs side by side
    assert set(sl.group) == {"majun20_coronacases_001", "majun20_radiopaedia_14"}
    assert not s.weak_lung


def test_medseg_infection_expert_lung_weak(shared_data):
    s = load_medseg(shared_data, S, limit=4)
    sl = s.slices
    assert len(sl) == 4 and s.weak_lung
    assert set(np.unique(sl.infection)) <= {0, 1} and sl.infection.any()
    assert set(np.unique(sl.lung)) <= {0, 1}
    assert (sl.infection <= sl.lung).all()  # infection lies inside the (weak) lung
    assert (sl.cls == 1).all()  # every MedSeg slice holds infection
    assert all(g.startswith("medseg_slice_") for g in sl.group)
    unknown = load_medseg(shared_data, S, limit=2, weak_lung=False)
    assert not _known(unknown.slices.lung).any() and not unknown.weak_lung


def test_medseg_rotated_to_display(shared_data):
    s = load_medseg(shared_data, S, limit=8, weak_lung=True).slices
    wide = [np.subtract(*_bbox_hw(m == 1)[::-1]) > 0 for m in s.lung]  # width > height
    assert sum(wide) >= 6


def test_cls2d_classes_and_groups(shared_data):
    s = load_cls2d(shared_data, S, limit=12)
    sl = s.slices
    assert set(sl.cls.tolist()) == {0, 1}
    assert not _known(sl.lung).any() and not _known(sl.infection).any()
    assert all(sl.group) and len(set(sl.group)) >= 2
    assert sl.images.max() > 200  # 8-bit pictures read through the lung window


def test_cls2d_normal_studies_get_an_empty_infection_mask(shared_data):
    s = load_cls2d(shared_data, S, limit=60, normal_infection=True)
    sl = s.slices
    inf_known = _known(sl.infection)
    ct0 = np.array(["mosmed_CT0" in f for f in s.files])
    assert ct0.any(), "the limited subset should hold some MosMed CT-0 slices"
    assert (inf_known == ct0).all()  # only CT-0 studies get the derived label; UCSD non-COVID stays class-only
    assert not sl.infection[inf_known].any() and (sl.cls[inf_known] == 0).all()
    assert not _known(sl.lung).any()


def test_imlab_volumes_have_lung_only(shared_data):
    s = load_imlab(shared_data, S, limit=5)
    sl = s.slices
    assert len(sl) == 10 and set(sl.group) == {"imlab_id001", "imlab_id002"}
    assert _known(sl.lung).all() and not _known(sl.infection).any()
    assert sl.lung.any()


def test_phantoms_full_labels():
    s = load_phantoms(2, S, shape=(8, 48, 48))
    sl = s.slices
    assert len(sl) == 16 and _known(sl.lung).all() and _known(sl.infection).all()
    assert set(np.unique(sl.cls)) <= {0, 1}
    assert len(set(sl.group)) == 2


def test_split_by_group_is_disjoint_and_covers_sources(shared_data):
    sets = load_sources(shared_data, S, sources=("medseg", "cls2d", "imlab", "majun"), phantoms=3,
                          phantom_shape=(6, 48, 48), limit=8, progress=False)
    vg = val_groups_for(sets, 0.3, seed=0)
    train, val = split_sets(sets, vg)
    tg = {g for s in train for g in s.slices.group}
    vgs = {g for s in val for g in s.slices.group}
    assert tg and vgs and not (tg & vgs)
    for t, v, s in zip(train, val, sets):
        assert len(t) + len(v) == len(s)
        if len(set(s.slices.group)) >= 2:
            assert len(v) > 0, f"{s.name} has no validation group"
    assert "volumes_covid_ct_md" not in " ".join(f for s in sets for f in s.files)
    assert len(combine(train, S)) == sum(len(t) for t in train)


def test_scan_cases_and_labels(shared_data):
    from hybrid_ct.evaluate.validation import scan_cases

    cases = scan_cases(shared_data, {"recipe": {"data": {"sources": ["wholescans"]}}})
    assert {"P001", "normal001"} <= set(cases)
    assert not cases["P001"]["trained_on"] and not cases["normal001"]["trained_on"]  # never trained on
    labels = read_slice_labels(cases["P001"]["slice_labels"])
    assert len(labels) == 148 and set(labels.values()) == {0, 1}
    if "cap001" in cases:  # volumes_hu/: slice labels by z_index, a training scan of the wholescans source
        assert cases["cap001"]["trained_on"] and set(read_slice_labels(cases["cap001"]["slice_labels"]).values()) == {0, 1}


def test_whole_scans_are_negatives_never_in_validation(shared_data):
    from hybrid_ct.data.wholescans import SCANS, load_wholescans

    if not all((shared_data / rel).is_file() for rel, _, _ in SCANS.values()):
        pytest.skip(f"whole HU scans {list(SCANS)} not in {shared_data / 'volumes_hu'}")
    s = load_wholescans(shared_data, 64)
    sl = s.slices
    assert set(sl.group) == {"wholescan_nsclc_lung1_001", "wholescan_cap001"}
    assert _known(sl.infection).all() and not (sl.infection == 1).any() and (sl.cls == 0).all()
    lung1 = np.array([g.endswith("lung1_001") for g in sl.group])
    assert _known(sl.lung[lung1]).all() and not _known(sl.lung[~lung1]).any()  # expert contours vs unknown
    assert sl.lung[lung1].any(axis=(1, 2)).sum() > 40  # the contours reached the model grid
    labels = read_slice_labels(shared_data / SCANS["cap001"][2])
    assert (~lung1).sum() == sum(v == 0 for v in labels.values())  # only cap001's clean slices
    assert not val_groups_for([s], 0.5, seed=0)  # judged by the scan-level check, never split


@pytest.mark.parametrize("stem", ["majun20__coronacases_org_003", "majun20__radiopaedia_org_covid-19-pneumonia-4_"])
def test_majun_pictures_turned_upright(shared_data, stem):
    files = sorted((shared_data / "cls2d" / "covid").glob(stem + "*"))
    if not files:
        pytest.skip(f"no {stem} pictures in this copy of the data")
    from hybrid_ct.imaging.body import body_mask

    for f in files[len(files) // 3:: max(1, len(files) // 4)]:
        for orient, wide in ((None, False), (_cls2d_orientation(f.name), True)):
            h, w = _bbox_hw(body_mask(picture_to_display_image(f, "8bit-auto", orient))[0])
            assert (w > 1.15 * h if wide else h > 1.15 * w), f.name  # a chest is wider than deep
