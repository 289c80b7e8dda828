"""Uncertainty with diversity: the most uncertain scan that is also unlike the scans already labelled.

Pure uncertainty sampling keeps asking for the same kind of scan while the model stays unsure of it (a
batch of near-duplicates teaches little more than one of them), and with one retrain per correction it
re-asks for that kind before a retrain has had a chance to learn it. This strategy ranks each scored,
unlabelled image by

    0.5 * uncertainty / max(uncertainty) + 0.5 * novelty / max(novelty)

where novelty is the distance, in standardised ``descriptor`` space (``uncertainty.descriptor``: intensity
histogram, noise, slice spacing, the network's mean lung / infection probability, recorded by the
``uncertainty`` scoring method), to the nearest image that already has a final label; with no labelled
image described yet, novelty is 1 for all and the rank is uncertainty's. Reservation and unscored images
as in ``SpikeUncertainty``.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from .uncertainty import KEY

logger = logging.getLogger(__name__)


def novelty(candidates: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Distance of each candidate descriptor to the nearest labelled one, both standardised together."""
    if not len(labelled):
        return np.ones(len(candidates))
    allf = np.vstack([candidates, labelled])
    mu, sd = allf.mean(0), allf.std(0)
    sd[sd < 1e-9] = 1.0
    c, lab = (candidates - mu) / sd, (labelled - mu) / sd
    return np.sqrt(((c[:, None, :] - lab[None, :, :]) ** 2).sum(-1)).min(1)


class DiverseUncertainty(Strategy):
    """Next sample = high spike-based uncertainty AND unlike the labelled scans (see the module docstring)."""

    def __init__(self, reserve_s: int = 600, weight: float = 0.5):
        super().__init__("Uncertain and unlike the labelled scans (run the 'uncertainty' scoring to update)")
        self.reserve_s, self.weight = int(reserve_s), float(weight)

    def __call__(self, request, datastore: Datastore):
        if hasattr(datastore, "refresh_if_changed"):
            datastore.refresh_if_changed()
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        strategy = request.get("strategy", "uncertainty_diverse")
        now = time.time()
        unlabelled = set(images)
        labelled = []
        for image_id in datastore.list_images():
            if image_id not in unlabelled:
                d = (datastore.get_image_info(image_id).get(KEY) or {}).get("descriptor")
                if d:
                    labelled.append(d)
        rows = []
        for image_id in images:
            info = datastore.get_image_info(image_id)
            u = info.get(KEY) or {}
            recent = now - (info.get("strategy") or {}).get(strategy, {}).get("ts", 0) < self.reserve_s
            rows.append((image_id, recent, u.get("score"), u.get("descriptor")))
        scored = [r for r in rows if r[2] is not None and r[3]]
        dim = len(scored[0][3]) if scored else 0
        scored = [r for r in scored if len(r[3]) == dim]  # descriptors of one definition only
        combined = {}
        if scored:
            lab = np.asarray([d for d in labelled if len(d) == dim], dtype=float).reshape(-1, dim)
            nov = novelty(np.asarray([r[3] for r in scored], dtype=float), lab)
            u = np.asarray([r[2] for r in scored], dtype=float)
            un = u / u.max() if u.max() > 0 else np.ones_like(u)
            nn = nov / nov.max() if nov.max() > 0 else np.ones_like(nov)
            for r, a, b in zip(scored, un, nn):
                combined[r[0]] = ((1 - self.weight) * a + self.weight * b, float(b))
        ranked = sorted(rows, key=lambda r: (r[1], r[0] not in combined, -combined.get(r[0], (0.0,))[0], r[0]))
        image_id, _, score, _ = ranked[0]
        rank, nov_b = combined.get(image_id, (None, None))
        logger.info("uncertainty_diverse strategy: %s (uncertainty %s, novelty %s, rank score %s)", image_id, score,
                    nov_b, rank)
        return {"id": image_id, KEY: score, "novelty": nov_b, "rank_score": rank}
