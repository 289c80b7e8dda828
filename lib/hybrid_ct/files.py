"""Files: writing them so a reader never sees half of one (temp file in the same folder + ``os.replace``),
JSON with plain types only, and a file's sha256 (models, downloads, batch inputs)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (checkpoints and downloads are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data, mode: str = "w") -> Path:
    """Write ``data`` (str or bytes) to ``path`` so that a reader never sees a half-written file; or a
    callable ``data(tmp_path)`` that writes the temp file itself (``torch.save``, SimpleITK)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb" if isinstance(data, bytes) else "w", encoding=None if isinstance(data, bytes) else "utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def jsonable(obj):
    """Plain JSON types only (numpy scalars and arrays converted, anything else as text): for HTTP
    result params, JSON reports and checkpoint meta (loaded with weights_only=True)."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))
