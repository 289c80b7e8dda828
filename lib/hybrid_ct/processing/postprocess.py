"""Post-processing rules on the network's label map: probabilities -> labels, and the lung components that
cannot be lung dropped (specks, bowel gas, the table, air outside the body)."""
from __future__ import annotations

import numpy as np

from hybrid_ct.contract import LABELS
from hybrid_ct.processing.anatomy import BODY_TRUSTED
from hybrid_ct.processing.crop import foreground_box


LUNG_MIN_COMPONENT = 0.05  # lung components below 5 % of the largest are dropped (volume path only)


def mask_label(lung_p: np.ndarray, inf_p: np.ndarray) -> np.ndarray:
    """Probabilities -> label map: 1 lung (no side yet: ``sides.lung_sides`` gives them), 2 infection (kept
    only inside the predicted lung)."""
    lung = lung_p > 0.5
    label = lung.astype(np.uint8) * LABELS["lung"]
    label[lung & (inf_p > 0.5)] = LABELS["infection"]
    return label


def keep_lung_components(label: np.ndarray, min_fraction: float = LUNG_MIN_COMPONENT,
                         body: np.ndarray | None = None) -> np.ndarray:
    """Drop predicted lung (and the infection inside it) that cannot be lung. ``label`` is one volume
    [D,H,W]; components are 3D. Dropped: components smaller than ``min_fraction`` of the largest one
    (specks, bowel gas) and, given the ``body`` mask (``io.body_mask``), components mostly outside the
    body (the table, blankets, air between the back and the table). On a single picture a component
    that reaches the image border is kept: a crop through the lungs, where the body outline cannot
    close. Then, slice by slice, lung outside the body that does not reach the image border (the air
    in front of the neck, joined to the apices through the airway: not a component of its own), if the
    body holds ``BODY_TRUSTED`` of the remaining lung. A body mask that misses the largest component
    failed (e.g. a tight crop) and is ignored.

    Runs on the box of the predicted lung (``crop.foreground_box``, one voxel of background around it):
    the same result as on the whole volume, at a fraction of the cost."""
    lung = label > 0
    box = foreground_box(lung)
    if box is None:
        return label
    use_body = body is not None and body.shape == label.shape
    part = label[box]
    sub = _keep_components(part, lung[box], min_fraction, body[box] if use_body else None, single=len(label) == 1)
    if sub is part:  # nothing dropped
        return label
    out = label.copy()
    out[box] = sub
    return out


def _keep_components(label: np.ndarray, lung: np.ndarray, min_fraction: float, body: np.ndarray | None,
                     single: bool) -> np.ndarray:
    """``keep_lung_components`` on a box around the lung; ``single``: the whole input is one picture."""
    from scipy import ndimage

    comp, n = ndimage.label(lung)
    if n == 0:
        return label
    idx = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(lung, comp, index=idx)
    keep = sizes >= min_fraction * sizes.max()
    use_body = body is not None
    if use_body:
        inside = ndimage.mean(body, comp, index=idx) >= 0.5
        use_body = bool(inside[np.argmax(sizes)])
        if use_body:
            keep &= inside | (single & np.isin(idx, _border_ids(comp)))
    out = label
    if not keep.all():
        out = label.copy()
        out[~np.isin(comp, idx[keep])] = 0
    lung = out > 0
    if use_body and lung[body].sum() >= BODY_TRUSTED * lung.sum():
        out = _drop_enclosed_outside(out, body)
    return out


def _border_ids(comp: np.ndarray) -> np.ndarray:
    """Labels of ``comp`` [D,H,W] found on the in-plane image border."""
    return np.unique(np.concatenate([comp[:, [0, -1], :].ravel(), comp[:, :, [0, -1]].ravel()]))


def _drop_enclosed_outside(label: np.ndarray, body: np.ndarray) -> np.ndarray:
    """``label`` with its lung outside ``body`` removed where, within its slice, it does not reach the border."""
    from scipy import ndimage

    outside = (label > 0) & ~body
    if not outside.any():
        return label
    per_slice = np.zeros((3, 3, 3), bool)
    per_slice[1] = ndimage.generate_binary_structure(2, 1)
    pieces, _ = ndimage.label(outside, structure=per_slice)
    drop = (pieces > 0) & ~np.isin(pieces, _border_ids(pieces))
    if not drop.any():
        return label
    out = label.copy()
    out[drop] = 0
    return out
