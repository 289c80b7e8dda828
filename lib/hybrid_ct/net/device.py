"""Which torch device runs the network: one rule for the command line, the server and its retraining."""
from __future__ import annotations

import logging

import torch

from hybrid_ct.errors import InputError

logger = logging.getLogger(__name__)


def choose_device(name: str | None = "auto", strict: bool = True) -> str:
    """``auto`` (or empty): CUDA when there is a device, else the CPU. CUDA asked for without a device:
    an InputError when ``strict`` (a command line: silently running on the CPU would hide a broken GPU
    set-up), else a warning and the CPU (a server must keep serving)."""
    name = str(name or "auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        if strict:
            raise InputError(f"device {name}: no CUDA device is available to this torch ({torch.__version__}); "
                             "use cpu or auto")
        logger.warning("device %s asked for but no CUDA device is available: running on the CPU", name)
        return "cpu"
    return name
