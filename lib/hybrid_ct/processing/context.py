"""Context across slices (the 2.5D input): a slice and its neighbours at a fixed physical distance.

On one axial slice a vessel and a small ground-glass spot look alike; one slice above and below they
differ (a vessel continues, a lesion does not), and colon gas is not lung when the slices below show
bowel. A 2.5D network reads three channels: the slice ``CONTEXT_MM`` below, the slice, the slice
``CONTEXT_MM`` above, each interpolated linearly along z at that physical distance, so a 1 mm and a 5 mm
series give the network the same anatomy. Beyond the first or last slice the edge slice is repeated.
A picture (a single 2D slice) has no neighbours: its context channels repeat the slice itself, so a
2.5D network still reads pictures, as the single-slice network does.

The single-slice network (``in_channels`` 1) reads only the middle channel: every function here is the
identity for it.
"""
from __future__ import annotations

import numpy as np

CONTEXT_MM = 5.0  # about one to three slices of a chest CT; a vessel crosses it, a 1 cm lesion does not


def neighbours(x: np.ndarray, dz_mm: float, offset_mm: float = CONTEXT_MM) -> np.ndarray:
    """x [D, 1, S, S] (axial slices, axis 0 running cranio-caudally with spacing ``dz_mm``) -> the slices
    at ``-offset_mm`` and ``+offset_mm`` from each slice, [D, 2, S, S], linearly interpolated along z; without
    a spacing (pictures) or for a single slice, the slice itself."""
    d = x.shape[0]
    if d < 2 or not dz_mm or dz_mm <= 0:
        return np.repeat(x[:, :1], 2, axis=1)
    step = float(offset_mm) / float(dz_mm)  # slices between a slice and its neighbour
    out = np.empty((d, 2) + x.shape[2:], x.dtype)
    idx = np.arange(d, dtype=np.float64)
    for c, sign in enumerate((-1.0, 1.0)):
        z = np.clip(idx + sign * step, 0, d - 1)
        z0 = np.floor(z).astype(int)
        z1 = np.minimum(z0 + 1, d - 1)
        w = (z - z0).astype(np.float32)[:, None, None]
        out[:, c] = (1 - w) * x[z0, 0] + w * x[z1, 0] if x.dtype.kind == "f" else \
            np.rint((1 - w) * x[z0, 0] + w * x[z1, 0]).astype(x.dtype)
    return out


def with_context(x: np.ndarray, channels: int, dz_mm: float | None = None,
                 offset_mm: float = CONTEXT_MM) -> np.ndarray:
    """x [D, 1, S, S] -> the network input [D, channels, S, S]: for 3 channels (below, slice, above) of a
    volume with slice spacing ``dz_mm``; without ``dz_mm`` (pictures) the slice repeated."""
    if channels == 1 or x.shape[1] == channels:
        return x
    if channels != 3 or x.shape[1] != 1:
        raise ValueError(f"context input: 1 or 3 channels from a 1-channel stack, got {channels} from {x.shape[1]}")
    return stack(x, neighbours(x, dz_mm, offset_mm))


def stack(x: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """The 2.5D channel order: x [D, 1, S, S] and its neighbours [D, 2, S, S] -> [D, 3, S, S] (below, slice, above)."""
    return np.concatenate([nb[:, :1], x, nb[:, 1:]], axis=1)
