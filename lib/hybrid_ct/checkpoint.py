"""Saving and loading a trained network with its configuration and provenance."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import ModelNotReadyError
from .model import HybridMultiTaskNet, NetConfig


def save_checkpoint(path, model: HybridMultiTaskNet, meta: dict | None = None) -> Path:
    """Write atomically (temp file + rename): a reader never sees a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": model.cfg.to_dict(), "state_dict": model.state_dict(), "meta": dict(meta or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path, device: str | torch.device = "cpu"):
    """-> (model in eval mode, meta). Raises ModelNotReadyError when there is no usable checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotReadyError(f"no trained model at {path}: train one first (or use the shipped model)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        model = HybridMultiTaskNet(NetConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as e:  # corrupt / foreign file
        raise ModelNotReadyError(f"checkpoint {path} cannot be loaded: {e}") from e
    return model.to(device).eval(), payload.get("meta", {})
