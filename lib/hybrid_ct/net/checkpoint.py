"""Saving and loading a trained network with its configuration and provenance."""
from __future__ import annotations

from pathlib import Path

import torch

from hybrid_ct.errors import ModelNotReadyError
from hybrid_ct.files import write_atomic
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig


def save_checkpoint(path, model: HybridMultiTaskNet, meta: dict | None = None) -> Path:
    """Write atomically (temp file + rename): a reader never sees a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": model.cfg.to_dict(), "state_dict": model.state_dict(), "meta": dict(meta or {})}
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


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
