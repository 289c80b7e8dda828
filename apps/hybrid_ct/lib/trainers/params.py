"""Train request parameters: what a client may send, checked (BadRequest -> HTTP 400), and turned into the
core's ``TrainConfig`` (the one set of training defaults, the CLI recipes' too)."""
from __future__ import annotations

import math
import re

from hybrid_ct.contract import SEG_HEADS, TRAINED_HEADS
from hybrid_ct.train.config import TrainConfig

from ..validation import BadRequest

PARAMS = {  # name: (type, minimum, maximum) of the numeric train params a client may send
    "max_epochs": (int, 1, 100000),
    "train_batch_size": (int, 1, 1024),
    "val_batch_size": (int, 1, 1024),
    "learning_rate": (float, 1e-8, 10.0),
    "weight_decay": (float, 0.0, 1.0),
    "negative_fraction": (float, 0.0, 1.0),
    "val_split": (float, 0.0, 0.9),
    "max_iters_per_epoch": (int, 0, 10**9),
    "seed": (int, 0, 2**31 - 1),
    "num_workers": (int, 0, 64),
    **{f"lambda_{head}": (float, 1e-6, 1e3) for head in TRAINED_HEADS},  # loss weight per head (contract.json)
    "spike_rate_weight": (float, 0.0, 100.0),  # the firing-rate regulariser (0: off)
    "promote_tolerance": (float, 0.0, 1.0),  # a retrain is "not worse" when new >= served - tolerance
    "max_minutes": (float, 0.0, 7 * 24 * 60.0),  # wall-clock budget of a run, publishing included (0: none)
    "replay_slices": (int, 0, 10**6),  # slices of the original training data mixed into the retraining
    "gate_replay_share": (float, 0.0, 0.9),  # share of the replay file held out for the promotion gate
    "new_share": (float, 0.0, 0.9),  # share of the training slices from the corrected scans (0: each once)
}
BOOLS = ("pretrained", "augment", "multi_gpu", "force_promote", "freeze_bn", "from_shipped")
LISTS = ("promote_metrics",)  # names, as a JSON list or one comma-separated string
# what a retrain may be compared on: the validation score and the metrics train_stats shows per epoch
PROMOTE_METRICS = ("score", *(f"{h}_{m}" for h in SEG_HEADS for m in ("dice", "iou")),
                   "cls_auc", "cls_accuracy", "cls_sensitivity", "cls_specificity")


def _bool(v, name):
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise BadRequest(f"train parameter {name} must be true or false, got {v!r}")


def validate_params(params: dict) -> dict:
    """Type-check the train params a client sent (BadRequest -> HTTP 400); returns them coerced."""
    out = dict(params or {})
    for name, (typ, lo, hi) in PARAMS.items():
        if name not in out or out[name] is None:
            continue
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise BadRequest(f"train parameter {name} must be a number, got {v!r}")
        try:
            num = float(v)
        except ValueError:
            raise BadRequest(f"train parameter {name} must be a number, got {v!r}") from None
        if math.isnan(num) or num < lo or num > hi or (typ is int and num != int(num)):
            raise BadRequest(f"train parameter {name} must be {'an integer' if typ is int else 'a number'} "
                             f"in [{lo}, {hi}], got {v!r}")
        out[name] = typ(num)
    for name in BOOLS:
        if name in out and out[name] is not None:
            out[name] = _bool(out[name], name)
    if out.get("promote_metrics") is not None:
        out["promote_metrics"] = metric_names(out["promote_metrics"])
    gpus = out.get("gpus")
    if gpus is not None and not (isinstance(gpus, str) and re.match(r"^(all|\d+(,\d+)*)$", gpus.strip())):
        raise BadRequest(f"train parameter gpus must be 'all' or GPU indices like '0,1', got {gpus!r}")
    return out


def metric_names(value) -> list:
    """``promote_metrics`` -> a list of known metric names (BadRequest naming the accepted ones)."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value]
    else:
        names = None
    if not names or any(n not in PROMOTE_METRICS for n in names):
        raise BadRequest(f"train parameter promote_metrics must name one or more of {list(PROMOTE_METRICS)} "
                         f"(a list or a comma-separated string), got {value!r}")
    return list(dict.fromkeys(names))


DEFAULTS = TrainConfig()  # the one set of training defaults (the CLI recipes' too)
REQUEST_TO_CONFIG = {"max_epochs": "epochs", "train_batch_size": "batch_size", "val_batch_size": "val_batch_size",
                     "learning_rate": "lr", "weight_decay": "weight_decay", "negative_fraction": "negative_fraction",
                     "augment": "augment", "max_iters_per_epoch": "max_iters_per_epoch", "seed": "seed",
                     "num_workers": "num_workers", "spike_rate_weight": "spike_rate_weight", "freeze_bn": "freeze_bn"}


def train_config(req: dict, device) -> TrainConfig:
    """A validated request -> the core's TrainConfig; absent params keep TrainConfig's defaults."""
    lambdas = {}
    for head, default in DEFAULTS.lambdas.items():
        v = req.get(f"lambda_{head}", default)
        try:
            lambdas[head] = float(v) if not isinstance(v, bool) else float("nan")
        except (TypeError, ValueError):
            lambdas[head] = float("nan")
        if not 0.0 < lambdas[head] < float("inf"):
            raise BadRequest(f"train parameter lambda_{head} must be a number > 0, got {v!r}")
    given = {field: req[key] for key, field in REQUEST_TO_CONFIG.items() if req.get(key) is not None}
    given["max_iters_per_epoch"] = given.get("max_iters_per_epoch") or None  # 0: the whole epoch
    return TrainConfig(**given, lambdas=lambdas, device=str(device))


def public_params(req: dict) -> dict:
    keys = list(PARAMS) + list(BOOLS) + list(LISTS)
    return {k: req[k] for k in keys if k in req}
