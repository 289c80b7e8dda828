"""The active-learning strategies without a server: the diversity-aware uncertainty strategy and the scan
descriptor the uncertainty scoring records for it."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib.activelearning import DiverseUncertainty, SpikeUncertainty, descriptor, novelty  # noqa: E402


class Store:
    """The few Datastore calls the strategies make."""

    def __init__(self, infos: dict, labelled: set):
        self.infos, self.labelled = infos, labelled

    def get_unlabeled_images(self, *a):
        return sorted(i for i in self.infos if i not in self.labelled)

    def list_images(self):
        return sorted(self.infos)

    def get_image_info(self, image_id):
        return self.infos[image_id]


def _u(score, d):
    return {"uncertainty": {"score": score, "descriptor": d}}


def test_diverse_passes_over_a_near_duplicate_of_a_labelled_scan():
    infos = {"done": _u(0.9, [1.0, 0.0]),  # labelled, of kind A
             "a_twin": _u(0.80, [1.0, 0.01]),  # the most uncertain, but kind A again
             "b": _u(0.70, [0.0, 1.0]),  # a little less uncertain, a kind not labelled yet
             "c": _u(0.10, [0.1, 0.9])}
    ds = Store(infos, {"done"})
    assert SpikeUncertainty()({"strategy": "uncertainty"}, ds)["id"] == "a_twin"
    pick = DiverseUncertainty()({"strategy": "uncertainty_diverse"}, ds)
    assert pick["id"] == "b" and pick["novelty"] > 0.5


def test_diverse_is_plain_uncertainty_without_labelled_descriptors_and_skips_reserved():
    infos = {"x": _u(0.3, [0.0]), "y": _u(0.6, [1.0]), "z": {}}
    ds = Store(infos, set())
    assert DiverseUncertainty()({"strategy": "uncertainty_diverse"}, ds)["id"] == "y"
    infos["y"]["strategy"] = {"uncertainty_diverse": {"ts": time.time()}}
    assert DiverseUncertainty()({"strategy": "uncertainty_diverse"}, ds)["id"] == "x"
    assert DiverseUncertainty()({}, Store({}, set())) is None


def test_novelty_and_descriptor():
    nov = novelty(np.array([[0.0, 0.0], [5.0, 5.0]]), np.array([[0.0, 0.0]]))
    assert nov[0] == 0.0 and nov[1] > 1.0
    assert np.all(novelty(np.zeros((3, 2)), np.zeros((0, 2))) == 1.0)
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0.5, 0.05, (4, 3, 16, 16)), 0, 1).astype(np.float32)
    noisy = np.clip(rng.normal(0.5, 0.2, (4, 3, 16, 16)), 0, 1).astype(np.float32)
    p = np.full((4, 16, 16), 0.5)
    d, dn = descriptor(x, p, p, 5.0), descriptor(noisy, p, p, 5.0)
    assert len(d) == 12 and abs(sum(d[:8]) - 1.0) < 1e-3 and d[9] == 0.5
    assert dn[8] > d[8]  # the noise entry sees low dose


def test_campaign_pool_draws_lesions_into_real_lungs_only(small_negative_phantom):
    """The campaign's ``lesions`` scans (benchmarks/al_pools.py): lesions labelled 2 only inside the lung, the
    image changed only there, never where the case keeps them out (LUNG1-001's tumour and its margin)."""
    import SimpleITK as sitk

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import al_pools

    image, label, _ = small_negative_phantom
    lab = sitk.GetArrayFromImage(label)
    lung = lab > 0
    keep_out = np.zeros_like(lung)
    keep_out[:, :, : lab.shape[2] // 2] = True  # one side of the body
    case = al_pools.Case("realish", "real", image, sitk.Cast(label > 0, sitk.sitkUInt8), False, {}, keep_out)
    (out,) = al_pools.lesion_cases([case], seed=3)
    new_lab, new_hu = sitk.GetArrayFromImage(out.label), sitk.GetArrayFromImage(out.image)
    old_hu = sitk.GetArrayFromImage(image)
    assert out.kind == "lesions" and out.positive and out.info["lesions"] >= 1
    assert (new_lab == 2).any() and not ((new_lab == 2) & ~lung).any() and not ((new_lab == 2) & keep_out).any()
    assert np.array_equal(new_lab > 0, lung)  # the lung outline is kept; lesions sit inside it
    changed = ~np.isclose(new_hu, old_hu)
    assert changed.any() and not (changed & ~(lung & ~keep_out)).any()
    assert out.image.GetSpacing() == image.GetSpacing() and out.image.GetOrigin() == image.GetOrigin()
