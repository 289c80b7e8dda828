"""Spike-based uncertainty for active learning: a scoring method that records, for every unlabelled
image, how unsure the served spiking network is, and a strategy that serves the most uncertain one.

Per image (up to ``max_slices`` evenly spaced axial slices, one forward pass each):

- ``seg_entropy``: per-pixel predictive (binary) entropy of the two segmentation heads' sigmoid
  outputs, in bits, averaged over the pixels where either head is not confidently background
  (p > 0.05; the body of air around the patient would otherwise dilute it), then over slices;
- ``firing_variance``: the variance of the classifier's output spikes across the T time steps. For a
  binary spike train with firing rate r that variance is r (1 - r); scaled by 4 to [0, 1] and
  averaged over the two output neurons and the slices. A neuron that fires at every step, or never,
  is certain; one that fires every other step is maximally undecided.

``score = (seg_entropy + firing_variance) / 2`` in [0, 1], stored in the image info as
``uncertainty`` together with the model version it was computed with; images are re-scored when the
served version changes.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from hybrid_ct.contract import SEG_HEADS
from hybrid_ct.processing.context import with_context
from hybrid_ct.errors import InputError, ModelNotReadyError
from hybrid_ct.imaging.reader import read_image
from hybrid_ct.processing.transforms import to_model_slices

from ..infers.hybrid_ct import ModelServer

logger = logging.getLogger(__name__)
KEY = "uncertainty"


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def spike_uncertainty(predictor, image, max_slices: int = 16) -> dict:
    """Uncertainty of ``predictor`` on a SimpleITK ``image`` (see the module docstring)."""
    cfg = predictor.model.cfg
    x, ctx = to_model_slices(image, cfg.in_size, cfg.input_spec())
    x = with_context(x, cfg.in_channels, ctx.canon_spacing[0], cfg.context_mm)  # before thinning: true neighbours
    if len(x) > max_slices:
        x = x[np.linspace(0, len(x) - 1, max_slices).round().astype(int)]
    out = predictor.run_slices(x)
    probs = [getattr(out, h)[:, 0] for h in SEG_HEADS]  # every segmentation head of contract.json
    ent = sum(_binary_entropy(p) for p in probs)  # 0..len(probs) bits per pixel
    roi = np.logical_or.reduce([p > 0.05 for p in probs])
    per_slice = [float(e[m].mean()) / len(probs) if m.any() else 0.0 for e, m in zip(ent, roi)]
    lung, inf = out.lung[:, 0], out.infection[:, 0]
    rates = np.clip(np.asarray(out.rates, dtype=np.float64), 0, 1)
    firing_var = float((4 * rates * (1 - rates)).mean()) if rates.size else 0.0
    seg_entropy = float(np.mean(per_slice)) if per_slice else 0.0
    return {"score": round((seg_entropy + firing_var) / 2, 6), "seg_entropy": round(seg_entropy, 6),
            "firing_variance": round(firing_var, 6), "slices": int(len(x)),
            "descriptor": descriptor(x, lung, inf, float(ctx.canon_spacing[0]))}


def descriptor(x: np.ndarray, lung: np.ndarray, inf: np.ndarray, dz_mm: float) -> list:
    """What kind of scan this is, for diversity (``diverse.DiverseUncertainty``): an 8-bin histogram of the
    windowed input inside the body, the in-plane noise (median absolute difference of neighbouring
    pixels), the slice spacing (cm), and the network's mean lung / infection probability."""
    centre = x[:, x.shape[1] // 2] if x.ndim == 4 else x  # the slice itself of a 2.5D stack
    body = centre > 0.02
    vals = centre[body] if body.any() else centre.ravel()
    hist = np.histogram(vals, bins=8, range=(0.0, 1.0))[0] / max(vals.size, 1)
    noise = float(np.median(np.abs(np.diff(centre, axis=-1))[body[..., 1:]])) if body.any() else 0.0
    return [round(float(v), 5) for v in (*hist, noise, dz_mm / 10.0, float(lung.mean()), float(inf.mean()))]


class SpikeUncertaintyScoring(ScoringMethod):
    """Records each unlabelled image's spike-based uncertainty in the datastore (image info)."""

    def __init__(self, server: ModelServer, max_slices: int = 16):
        super().__init__("Spike-based uncertainty of unlabelled images (seg-head entropy + firing variance "
                         "across time steps), stored as image info 'uncertainty'")
        self.server = server
        self.max_slices = int(max_slices)

    PARAMS = {"force": (bool, None, None), "max_images": (int, 0, 10**6), "max_slices": (int, 1, 4096)}

    def validate_params(self, params: dict) -> dict:
        """What a client may send to POST /scoring/uncertainty; BadRequest (400) names the problem."""
        from ..validation import BadRequest

        if not isinstance(params, dict):
            raise BadRequest(f"scoring params must be a JSON object, got {type(params).__name__}")
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise BadRequest(f"unknown scoring parameter(s) {unknown}: accepted are {sorted(self.PARAMS)}")
        for key, (typ, lo, hi) in self.PARAMS.items():
            v = params.get(key)
            if v is None:
                continue
            ok = isinstance(v, bool) if typ is bool else (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi)
            if not ok:
                want = "true or false" if typ is bool else f"an integer in [{lo}, {hi}]"
                raise BadRequest(f"scoring parameter {key} must be {want}, got {v!r}")
        return dict(params)

    def __call__(self, request, datastore: Datastore):
        try:
            served = self.server.get()
        except ModelNotReadyError as e:
            logger.info("uncertainty scoring skipped: %s", e)
            return {"scored": 0, "skipped": "no trained model yet"}
        if hasattr(datastore, "refresh_if_changed"):
            datastore.refresh_if_changed()
        force = bool(request.get("force", False))
        limit = int(request.get("max_images", 0) or 0)
        max_slices = int(request.get("max_slices", self.max_slices))
        scored, failed = {}, {}
        for image_id in sorted(datastore.get_unlabeled_images()):
            if limit and len(scored) >= limit:
                break
            info = datastore.get_image_info(image_id).get(KEY) or {}
            if not force and info.get("model_version") == served.version:
                continue
            try:
                img = read_image(datastore.get_image_uri(image_id))
                with self.server.running() as (now, _):
                    res = spike_uncertainty(now.predictor, img, max_slices)
            except InputError as e:
                failed[image_id] = str(e)
                logger.warning("uncertainty of %s not computed: %s", image_id, e)
                continue
            res.update(model_version=now.version, ts=int(time.time()))
            datastore.update_image_info(image_id, {KEY: res})
            scored[image_id] = res["score"]
            logger.info("uncertainty %s = %.4f (%s)", image_id, res["score"], served.version)
        return {"scored": len(scored), "scores": scored, "failed": failed, "model_version": served.version}


class SpikeUncertainty(Strategy):
    """Next sample = the unlabelled image with the highest recorded spike-based uncertainty.

    Images served by this strategy within the last ``reserve_s`` seconds are passed over (so two
    annotators do not get the same scan) unless nothing else is left; images not scored yet come
    after all scored ones, in id order.
    """

    def __init__(self, reserve_s: int = 600):
        super().__init__("Highest spike-based uncertainty first (run the 'uncertainty' scoring to update)")
        self.reserve_s = int(reserve_s)

    def __call__(self, request, datastore: Datastore):
        if hasattr(datastore, "refresh_if_changed"):
            datastore.refresh_if_changed()
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        strategy = request.get("strategy", "uncertainty")
        now = time.time()
        ranked = []
        for image_id in images:
            info = datastore.get_image_info(image_id)
            score = (info.get(KEY) or {}).get("score")
            served_ts = (info.get("strategy") or {}).get(strategy, {}).get("ts", 0)
            recent = now - served_ts < self.reserve_s
            ranked.append((recent, score is None, -(score or 0.0), image_id, score))
        ranked.sort()
        _, _, _, image_id, score = ranked[0]
        logger.info("uncertainty strategy: %s (score %s)", image_id, score)
        return {"id": image_id, KEY: score}
