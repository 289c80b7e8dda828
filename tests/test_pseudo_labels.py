"""Pseudo-labels (issue 27, point 2): the confidence rule, what may and may not be pseudo-labelled, the cache."""
import numpy as np
import pytest

from hybrid_ct.data.slice_store import MISSING, SliceSet, SourceSet
from hybrid_ct.errors import InputError
from hybrid_ct.train import pseudo_labels as pl

S = 32


def _set(name, groups, cls, known_infection=None):
    n = len(groups)
    rng = np.random.default_rng(len(name))
    images = rng.integers(0, 255, (n, S, S), dtype=np.uint8)
    inf = np.full((n, S, S), MISSING, np.uint8)
    for i in known_infection or []:
        inf[i] = 0
    return SourceSet(name, SliceSet(images, np.full((n, S, S), MISSING, np.uint8), inf, np.asarray(cls, np.int8),
                                    list(groups)))


def _blob_prob(n, sharp=True):
    """A confident 8 x 8 outline (p 0.95 on, 0.02 off), or the same blob hesitant (p 0.55 on, 0.4 around)."""
    p = np.full((n, S, S), 0.02, np.float32)
    if sharp:
        p[:, 8:16, 8:16] = 0.95
    else:
        p[:, 4:20, 4:20] = 0.4
        p[:, 8:16, 8:16] = 0.55
    return p


def test_confidence_rule_keeps_sharp_outlines_and_drops_hesitant_or_empty_ones():
    s = pl.settings(True)
    keep, masks, share = pl.confident_masks(_blob_prob(2, sharp=True), s, S)
    assert keep.all() and masks[0, 10, 10] == 1 and masks[0, 0, 0] == 0 and share.max() == 0
    keep, _, share = pl.confident_masks(_blob_prob(2, sharp=False), s, S)
    assert not keep.any() and (share == 1).all()  # every unsure pixel is in the band
    empty = np.full((1, S, S), 0.01, np.float32)
    assert not pl.confident_masks(empty, s, S)[0].any()  # nothing outlined on a positive slice: the teacher missed
    tiny = empty.copy()
    tiny[0, 0, 0] = 0.99  # one pixel (~120 mm^2 at 32 px and 350 mm): kept; below the area rule it is not
    assert pl.confident_masks(tiny, {**s, "min_area_mm2": 200.0}, S)[0].sum() == 0


def test_settings_are_checked():
    assert pl.settings({"low": 0.2})["high"] == 0.7
    with pytest.raises(InputError):
        pl.settings({"lowest": 0.2})
    with pytest.raises(InputError):
        pl.settings({"low": 0.6})


def test_only_positive_unmasked_slices_of_the_named_families_get_labels(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_CT_PSEUDO_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_teacher(model, images, batch_size=16):
        calls.append(len(images))
        return _blob_prob(len(images))

    monkeypatch.setattr(pl, "teacher_probabilities", fake_teacher)
    cls2d = _set("cls2d", ["majun20_a", "majun20_a", "majun20_b", "ucsd_c", "majun20_b"], [1, 1, 0, 1, 1],
                 known_infection=[4])
    other = _set("medseg", ["medseg_x"], [1])
    spec = {"teacher": str(model_path)}
    out, summary = pl.pseudo_label([cls2d, other], spec)
    inf = out[0].slices.infection
    assert summary["candidates"] == 2 and summary["kept"] == 2 and not summary["cached"] and calls == [2]
    assert inf[0, 10, 10] == 1 and inf[1, 10, 10] == 1  # Ma Jun positives without a mask: labelled
    assert inf[2, 0, 0] == MISSING  # a clean slice is never pseudo-labelled
    assert inf[3, 0, 0] == MISSING  # another collection
    assert (inf[4] == 0).all()  # a slice with its own mask keeps it
    assert out[1].slices.infection[0, 0, 0] == MISSING
    assert cls2d.slices.infection[0, 0, 0] == MISSING  # the input sets are not changed in place
    assert summary["groups"] == ["majun20_a"]
    again, summary2 = pl.pseudo_label([cls2d, other], spec)  # the same teacher, settings and pixels: cached
    assert summary2["cached"] and calls == [2] and np.array_equal(again[0].slices.infection, inf)
    _, summary3 = pl.pseudo_label([cls2d, other], {**spec, "low": 0.2})  # other settings: another entry
    assert not summary3["cached"] and calls == [2, 2]


def test_the_teacher_runs_at_its_own_grid(model_path):
    from hybrid_ct.net.checkpoint import load_checkpoint

    model, _ = load_checkpoint(model_path)  # a 64-pixel network on 32-pixel slices
    p = pl.teacher_probabilities(model, np.zeros((3, S, S), np.uint8))
    assert p.shape == (3, S, S) and p.dtype == np.float32 and ((p >= 0) & (p <= 1)).all()


def test_the_recipe_names_it_and_a_missing_teacher_is_an_input_error(tmp_path):
    from hybrid_ct.train.recipes import load_recipe

    r = load_recipe("shipped_synth_protocol_pseudo")
    assert r["data"]["pseudo"]["teacher"] == "default" and r["train"]["protocol_aug"] > 0
    assert "pseudo" not in load_recipe("shipped_synth_protocol")["data"]
    with pytest.raises(InputError):
        pl.pseudo_label([_set("cls2d", ["majun20_a"], [1])], {"teacher": str(tmp_path / "none.pt")})
