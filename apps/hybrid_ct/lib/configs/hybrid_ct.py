"""Task config ``hybrid_ct``: the spiking multi-task network as MONAI Label infer / train / scoring tasks.

Conf keys (``--conf key value``; all optional):

| key | default | meaning |
|---|---|---|
| ``model_dir`` | ``<app>/model`` (env ``HYBRID_CT_MODEL_DIR``) | versions, current pointer, shipped checkpoint, train_stats |
| ``shipped_model`` | ``pretrained.pt`` | the shipped checkpoint: a file in ``model_dir`` or an absolute path; when the default is absent, the model inside the ``hybrid_ct`` package; ``none``: no shipped model |
| ``net`` | ``{}`` | JSON ``NetConfig`` overrides for a network trained from scratch (no served model yet) |
| ``device`` | ``auto`` | inference device (``cuda`` when available) |
| ``infer_batch_size`` | ``8`` | slices per forward pass at inference |
| ``infer_amp`` | ``false`` | fp16 autocast for inference on CUDA (ignored on the CPU) |
| ``infer_compile`` | ``false`` | run a ``torch.compile``d network (``hybrid_ct.net.compiled``), compiled at start-up and when a version is published, not in a request |
| ``infer_compile_cache`` | ``$HYBRID_CT_COMPILE_CACHE`` or ``~/.cache/hybrid_ct/compile`` | root of inductor's on-disk caches, one folder per checkpoint sha256 |
| ``train`` | ``{}`` | JSON defaults for train requests (e.g. ``{"max_epochs": 20}``; ``max_minutes``, default 5, bounds a retrain's wall-clock time, publishing included; ``replay_slices``, default 256, slices of the original training data mixed in) |
| ``replay`` | ``<shipped model>.replay.npz`` | the original-data sample a retrain replays (``hybrid-ct train`` writes it beside the checkpoint); absent: no replay |
| ``scoring_max_slices`` | ``16`` | slices per image used for the uncertainty score |
"""
from __future__ import annotations

import json
import logging
import os

from hybrid_ct.contract import COLORS, FOREGROUND, PREDICTED
from monailabel.interfaces.config import TaskConfig

from hybrid_ct.errors import ModelNotReadyError
from hybrid_ct.net.model_files import default_model_path

from ..activelearning import DiverseUncertainty, SpikeUncertainty, SpikeUncertaintyScoring
from ..infers import HybridCTInfer, ModelServer
from ..store import ModelStore
from ..trainers import HybridCTTrain

logger = logging.getLogger(__name__)

LABELS = dict(FOREGROUND)  # every value a label may hold (lung, right / left lung, infection): hybrid_ct/contract.json


def _json_conf(conf: dict, key: str) -> dict:
    raw = conf.get(key)
    if raw in (None, ""):
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"--conf {key} must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--conf {key} must be a JSON object, got {raw!r}")
    return value


def _flag(conf: dict, key: str) -> bool:
    return str(conf.get(key, "false")).lower() in ("1", "true", "yes")


def shipped_model(model_dir: str, value) -> str | None:
    """The shipped checkpoint (see the conf table): None for ``none``."""
    value = str(value or "pretrained.pt")
    if value.lower() == "none":
        return None
    if value != "pretrained.pt" or os.path.isfile(os.path.join(model_dir, value)):
        return value
    try:
        return str(default_model_path())  # the package's model: a pip-installed server has one too
    except ModelNotReadyError:
        return value


class HybridCT(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict, planner=None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.labels = dict(LABELS)
        self.label_colors = dict(COLORS)
        self.store = ModelStore(model_dir, shipped=shipped_model(model_dir, conf.get("shipped_model")))
        self.path = str(self.store.shipped)
        self.server = ModelServer(self.store, device=conf.get("device"),
                                  batch_size=int(conf.get("infer_batch_size", 8)),
                                  amp=_flag(conf, "infer_amp"), compile_net=_flag(conf, "infer_compile"),
                                  compile_cache=conf.get("infer_compile_cache") or None)
        self.net_config = _json_conf(conf, "net")
        self.train_defaults = _json_conf(conf, "train")
        os.makedirs(model_dir, exist_ok=True)

    def infer(self):
        return {self.name: HybridCTInfer(
            self.server, dict(PREDICTED),  # what a prediction holds; corrections may also hold lung without a side
            description="Hybrid spiking multi-task network: right / left lung + infection label map, positive/negative "
                        "classification, infection burden and grade, energy estimate (whole CT volume)")}

    def trainer(self):
        return HybridCTTrain(self.store, net_config=self.net_config, labels=self.labels,
                             description="Retrain the hybrid spiking multi-task network on the final labels",
                             config=self.train_defaults, replay=self.conf.get("replay") or None)

    def strategy(self):
        return {"uncertainty": SpikeUncertainty(), "uncertainty_diverse": DiverseUncertainty()}

    def scoring_method(self):
        return {"uncertainty": SpikeUncertaintyScoring(self.server,
                                                       max_slices=int(self.conf.get("scoring_max_slices", 16)))}
