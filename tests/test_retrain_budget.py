"""Retraining latency (issue 16): a retrain replays a sample of the original training data and is bounded
by a wall-clock budget (``max_minutes``). The latency itself is measured by benchmarks/bench_app.py."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib.store import ModelStore  # noqa: E402
from lib.trainers.hybrid_ct import MAX_MINUTES, TRAIN_SHARE, Deadline, HybridCTTrain  # noqa: E402
from lib.trainers.data import split_replay, weigh_new  # noqa: E402
from lib.trainers.params import validate_params  # noqa: E402
from lib.validation import BadRequest  # noqa: E402

from hybrid_ct.data.slice_store import SliceSet, load_replay, replay_path, save_replay  # noqa: E402


def _slices(n: int, size: int = 16) -> SliceSet:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    lung = (img > 128).astype(np.uint8)
    return SliceSet(img, lung, np.zeros_like(lung), (np.arange(n) % 2).astype(np.int8), [f"g{i % 3}" for i in range(n)])


def test_replay_round_trip_and_sampling(tmp_path):
    data = _slices(20)
    path = replay_path(tmp_path / "model.pt")
    assert path.name == "model.replay.npz"
    assert save_replay(data, path, n=12) == 12
    back = load_replay(path)
    assert len(back) == 12 and back.images.dtype == np.uint8 and all(g.startswith("replay:g") for g in back.group)
    idx = [int(np.flatnonzero((data.images == im).all(axis=(1, 2)))[0]) for im in back.images]
    assert np.array_equal(back.lung, data.lung[idx]) and np.array_equal(back.cls, data.cls[idx])
    assert len(load_replay(path, 5, seed=1)) == 5


def test_the_app_trainer_replays_the_file_beside_the_shipped_model(tmp_path):
    store = ModelStore(tmp_path, shipped="pretrained.pt")
    task = HybridCTTrain(store)
    assert task.config()["max_minutes"] == MAX_MINUTES <= 5 and task.config()["replay_slices"] > 0
    assert task.replay_set(16, 8, 0.25, 0)[0] is None  # no file yet: no replay
    save_replay(_slices(20), replay_path(store.shipped), n=20)
    data, gate, path = task.replay_set(16, 8, 0.25, 0)
    assert len(data) == 8 and path.endswith("pretrained.replay.npz") and 0 < len(gate) < 12
    assert task.replay_set(32, 8, 0.25, 0)[0] is None  # another model size: not replayed
    assert task.replay_set(16, 0, 0.25, 0)[0] is None  # replay_slices 0: off
    assert len(task.replay_set(16, 100, 0.0, 0)[1]) == 0  # gate_replay_share 0: all of it trains


def test_the_gate_share_of_the_replay_is_fixed_and_never_trained_on():
    """The same slices are held out whatever the seed or the number replayed, and never in the training part."""
    data = _slices(40)
    data.images[:, 0, 0] = np.arange(40)  # a tag per slice
    train_a, gate_a = split_replay(data, 0.25, 100, seed=0)
    train_b, gate_b = split_replay(data, 0.25, 10, seed=7)
    assert gate_a.images[:, 0, 0].tolist() == gate_b.images[:, 0, 0].tolist() and 4 <= len(gate_a) <= 18
    assert len(train_a) + len(gate_a) == 40 and len(train_b) == 10
    assert not set(gate_a.images[:, 0, 0].tolist()) & set(train_a.images[:, 0, 0].tolist())
    assert not set(gate_b.images[:, 0, 0].tolist()) & set(train_b.images[:, 0, 0].tolist())


def test_corrected_slices_are_weighed_against_the_replay():
    new = _slices(16)
    out, k = weigh_new(new, 96, 0.5)
    assert k == 6 and len(out) == 96  # half of the training slices are the correction's
    assert weigh_new(new, 96, 0.0)[1] == 1 and weigh_new(new, 0, 0.5)[1] == 1  # off / nothing to weigh against
    assert weigh_new(new, 10000, 0.5)[1] == 8  # at most 8 copies
    assert weigh_new(new, 8, 0.5)[1] == 1  # already more than half


def test_deadline_stops_at_the_training_share_of_the_budget():
    never = Deadline(lambda: False, time.time(), 0)
    assert not never() and not never.hit
    asked = Deadline(lambda: True, time.time(), 5)
    assert asked() and not asked.hit  # a stop request is not the budget
    spent = Deadline(lambda: False, time.time() - TRAIN_SHARE * 60.0 - 1, 1.0)
    assert spent() and spent.hit


def test_budget_params_are_checked():
    assert validate_params({"max_minutes": "2.5", "replay_slices": 100}) == {"max_minutes": 2.5, "replay_slices": 100}
    assert validate_params({"new_share": "0.5", "gate_replay_share": 0}) == {"new_share": 0.5, "gate_replay_share": 0.0}
    for bad in ({"max_minutes": -1}, {"replay_slices": 1.5}, {"new_share": 1.0}, {"gate_replay_share": -0.1}):
        with pytest.raises(BadRequest):
            validate_params(bad)
