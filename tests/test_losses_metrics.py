"""Losses (seed 002 multi-loss, monai Dice/focal, seed 001 adaptive) and metrics (monai / scikit-learn)."""
import numpy as np
import pytest
import torch

from hybrid_ct.net.losses import MultiTaskLoss, SelfAdaptiveClassLoss, seg_loss
from hybrid_ct.train.metrics import classification_metrics, segmentation_metrics


def outputs(b=4, s=16, good=True):
    torch.manual_seed(0)
    y = (torch.rand(b, 1, s, s) > 0.7).float()
    logit = (y * 2 - 1) * (6.0 if good else -6.0)
    cls = torch.tensor([0, 1] * (b // 2))
    rates = torch.nn.functional.one_hot(cls if good else 1 - cls, 2).float()
    return {"cls_rates": rates, "cls_logits": rates * 4 - 2, "lung": logit, "infection": logit.clone()}, \
        {"cls": cls, "lung": y, "infection": y.clone()}


def test_multiloss_is_low_for_right_and_high_for_wrong_answers():
    good, t = outputs(good=True)
    bad, _ = outputs(good=False)
    loss = MultiTaskLoss()
    lg, parts = loss(good, t)
    lb, _ = loss(bad, t)
    assert set(parts) == {"cls", "lung", "infection"}
    assert float(lg) < 0.05 < float(lb)


def test_multiloss_is_the_lambda_weighted_sum():
    out, t = outputs(good=False)
    l1, p = MultiTaskLoss({"cls": 1, "lung": 1, "infection": 1})(out, t)
    l2, _ = MultiTaskLoss({"cls": 2, "lung": 0.5, "infection": 3})(out, t)
    assert float(l2) == pytest.approx(2 * p["cls"] + 0.5 * p["lung"] + 3 * p["infection"], rel=1e-5)
    assert float(l1) == pytest.approx(sum(p.values()), rel=1e-5)
    with pytest.raises(ValueError, match="lambda"):
        MultiTaskLoss({"cls": 0})


def test_cls_loss_is_mse_on_firing_rates():
    out, t = outputs()
    out["cls_rates"] = torch.full((4, 2), 0.5)
    _, p = MultiTaskLoss(cls_ce=0.0)(out, t)
    assert p["cls"] == pytest.approx(0.25)


def test_missing_targets_are_masked_out():
    out, t = outputs(good=False)
    t["lung_mask"] = torch.tensor([False] * 4)
    t["cls_mask"] = torch.tensor([True, False, False, False])
    _, p = MultiTaskLoss()(out, t)
    assert "lung" not in p and "cls" in p
    with pytest.raises(ValueError, match="no head"):
        MultiTaskLoss()({"lung": out["lung"]}, {"lung": t["lung"], "lung_mask": torch.zeros(4, dtype=torch.bool)})


@pytest.mark.parametrize("kind", ["focal", "dice", "dice_focal", "dice_ce"])
def test_segmentation_losses_prefer_the_right_mask(kind):
    good, t = outputs(good=True)
    bad, _ = outputs(good=False)
    fn = seg_loss(kind)
    assert float(fn(good["lung"], t["lung"])) < float(fn(bad["lung"], t["lung"]))
    with pytest.raises(ValueError):
        seg_loss("hinge")


def test_deep_supervision_adds_scaled_auxiliary_terms():
    out, t = outputs(good=False)
    base, p0 = MultiTaskLoss()(out, t)
    out["lung_aux"] = [torch.zeros(4, 1, 8, 8)]
    _, p1 = MultiTaskLoss()(out, t)
    assert p1["lung"] > p0["lung"]


def test_self_adaptive_loss_weights_the_rare_class_and_learns_alpha_beta():
    loss = SelfAdaptiveClassLoss(class_counts=[900, 100])
    w = loss.class_weights()
    assert w[1] > w[0]
    logits = torch.zeros(4, 2, requires_grad=True)
    value = loss(logits, torch.tensor([0, 1, 1, 0]))
    value.backward()
    assert loss.alpha_logit.grad is not None and loss.beta_logit.grad is not None
    out, t = outputs(good=False)
    _, p = MultiTaskLoss(adaptive_cls=True)(out, t)
    assert p["cls"] > 0


def test_segmentation_metrics_by_hand():
    true = np.zeros((10, 10), int)
    true[2:8, 2:8] = 1
    true[4:6, 4:6] = 2
    pred = np.zeros((10, 10), int)
    pred[2:8, 2:9] = 1
    pred[4:6, 4:7] = 2
    m = segmentation_metrics(pred, true)
    assert m["lung"]["dice"] == pytest.approx(2 * 36 / (36 + 42))
    assert m["lung"]["iou"] == pytest.approx(36 / 42)
    assert m["infection"]["dice"] == pytest.approx(2 * 4 / (4 + 6))
    assert m["infection"]["sensitivity"] == pytest.approx(1.0)
    assert m["infection"]["precision"] == pytest.approx(4 / 6)
    assert m["infection"]["specificity"] == pytest.approx(94 / 96)


def test_classification_metrics():
    m = classification_metrics([0, 0, 1, 1, 1], [0.1, 0.6, 0.7, 0.9, 0.4])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["roc"]["fpr"][0] == 0 and m["roc"]["tpr"][-1] == 1
    one_class = classification_metrics([1, 1], [0.2, 0.9])
    assert np.isnan(one_class["auc"]) and one_class["sensitivity"] == 0.5
