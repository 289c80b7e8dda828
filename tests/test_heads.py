"""The heads are data: contract.json "heads" declares each head once (kind, labels, loss, lambda, report key),
and the network, the loss, the targets, the training defaults and the app's train parameters follow it."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_ct import contract
from hybrid_ct.data.slice_store import slices_from_arrays
from hybrid_ct.net.losses import MultiTaskLoss
from hybrid_ct.net.network import HEADS, HybridMultiTaskNet, NetConfig
from hybrid_ct.train.config import TrainConfig
from hybrid_ct.train.metrics import SEG_CLASSES

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct"


def _toy_heads() -> dict:
    """The contract's heads plus a fourth segmentation head learning the infection label, with its own loss."""
    heads = copy.deepcopy(contract.HEADS)
    heads["toy"] = {"name": "toy", "kind": "segmentation", "labels": ["infection"], "loss": "dice", "lambda": 3.0,
                    "report": "burden"}
    return heads


def test_the_declaration_is_the_network_and_training_default():
    declared = [h["name"] for h in contract.CONTRACT["heads"] if h["kind"] != "derived"]
    assert list(HEADS) == declared == list(NetConfig().heads)
    net = HybridMultiTaskNet(NetConfig(levels=2, base_channels=4, time_steps=1, fc_hidden=8, in_size=16))
    seg = [h["name"] for h in contract.CONTRACT["heads"] if h["kind"] == "segmentation"]
    assert list(net.seg) == seg and net.cls is not None
    out = net(torch.zeros(2, 1, 16, 16))
    assert {k for k in out if not k.startswith("cls")} == set(seg)
    lambdas = {h["name"]: h["lambda"] for h in contract.CONTRACT["heads"] if h["kind"] != "derived"}
    assert TrainConfig().lambdas == lambdas == MultiTaskLoss().lambdas
    assert TrainConfig().seg_loss == contract.HEADS["lung"]["loss"]
    assert TrainConfig().infection_loss == contract.HEADS["infection"]["loss"]
    assert SEG_CLASSES == {h: tuple(contract.LABELS[x] for x in contract.HEADS[h]["labels"]) for h in seg}
    for h in contract.CONTRACT["heads"]:  # every head names a report key the report has
        assert contract.report_key("keys", h["report"]) == h["report"]


def test_a_toy_head_in_the_table_gets_its_loss_term_and_lambda():
    torch.manual_seed(0)
    y = (torch.rand(4, 1, 8, 8) > 0.5).float()
    out = {"lung": torch.randn(4, 1, 8, 8), "infection": torch.randn(4, 1, 8, 8), "toy": torch.randn(4, 1, 8, 8)}
    targets = {"lung": y, "infection": y.clone(), "toy": y.clone()}
    base_total, base = MultiTaskLoss()(out, targets)
    assert "toy" not in base  # not declared: no term, whatever the output holds
    loss = MultiTaskLoss(heads=_toy_heads())
    total, parts = loss(out, targets)
    assert set(parts) == {"lung", "infection", "toy"}
    assert loss.lambdas["toy"] == 3.0 and type(loss.seg["toy"]).__name__ == "DiceLoss"
    assert float(total) == pytest.approx(float(base_total) + 3.0 * parts["toy"], rel=1e-5)
    # its lambda is overridable like any other, and a head without a target is skipped
    _, parts = MultiTaskLoss({"toy": 0.5}, heads=_toy_heads())(out, {k: v for k, v in targets.items() if k != "toy"})
    assert "toy" not in parts


def test_targets_are_the_union_of_each_heads_labels():
    label = np.array([[0, contract.LABELS["lung"], contract.LABELS["infection"]]], np.uint8)
    t = contract.head_targets(label)
    assert set(t) == set(contract.SEG_HEADS)
    assert t["lung"].tolist() == [[False, True, True]] and t["infection"].tolist() == [[False, False, True]]
    toy = {n: tuple(contract.LABELS[x] for x in h["labels"]) for n, h in _toy_heads().items()
           if h["kind"] == "segmentation"}
    assert contract.head_targets(label, toy)["toy"].tolist() == t["infection"].tolist()
    # the slice store builds its masks from the same table
    x = np.zeros((1, 1, 1, 3), np.float32)
    s = slices_from_arrays(x, label[None], "g")  # [D, S, S]: one slice of 1 x 3 pixels
    assert s.lung[0].tolist() == t["lung"].astype(np.uint8).tolist()
    assert s.infection[0].tolist() == t["infection"].astype(np.uint8).tolist() and s.cls.tolist() == [1]


def test_the_apps_train_parameters_follow_the_heads():
    pytest.importorskip("monailabel")
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.trainers import params

    assert {k for k in params.PARAMS if k.startswith("lambda_")} == {f"lambda_{h}" for h in contract.TRAINED_HEADS}
    assert {f"{h}_dice" for h in contract.SEG_HEADS} <= set(params.PROMOTE_METRICS)


def test_a_head_naming_an_unknown_label_is_refused(monkeypatch):
    bad = copy.deepcopy(contract.HEADS)
    bad["lung"]["labels"] = ["lung", "no_such_label"]
    monkeypatch.setattr(contract, "HEADS", bad)
    with pytest.raises(ValueError, match="no_such_label"):
        contract._check_heads()
