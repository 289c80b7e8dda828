"""Where the default (shipped) model is: no repository paths, so a non-editable ``pip install`` works.

The shipped checkpoint is package data, ``hybrid_ct/net/models/pretrained.pt``; ``$HYBRID_CT_MODEL`` points
the library (and the ``hybrid-ct`` commands' ``--model`` default) at another one.
"""
from __future__ import annotations

import os
from pathlib import Path

from hybrid_ct.errors import ModelNotReadyError

MODEL_ENV = "HYBRID_CT_MODEL"
PACKAGED_MODEL = Path(__file__).resolve().parent / "models" / "pretrained.pt"
"""Where the package keeps its shipped checkpoint (``hybrid-ct train`` writes here by default)."""
MAX_CHECKPOINT_MB = 20.0
"""Size limit of the shipped model (``train_one`` warns above it)."""


def default_model_path() -> Path:
    """The model used when none is named: ``$HYBRID_CT_MODEL`` if set, else the checkpoint shipped inside
    the package. Raises ModelNotReadyError when neither exists."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    if PACKAGED_MODEL.is_file():
        return PACKAGED_MODEL
    raise ModelNotReadyError(f"no default model: the package holds no {PACKAGED_MODEL.name} "
                             f"({PACKAGED_MODEL.parent}) and ${MODEL_ENV} is not set; pass --model or set "
                             f"${MODEL_ENV} to a checkpoint")
