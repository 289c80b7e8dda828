"""Is a retrain not worse than the served model? Both scored on the same slices, which the retrain never trained on.

Those are the held-out corrected images and the replay's held-out share when there are any. When there are
none (one correction per round: nothing held out yet), the retrain is published ``pending`` and judged at
the start of the next retrain on the corrections that arrived since, which neither it nor the served model
has seen ("test, then train"). It is never judged on the slices it has just fitted: the shipped-network
campaign promoted 5 retrains judged that way, and all 5 lowered the test Dice
(docs/active_learning_shipped.md).
"""
from __future__ import annotations

import numpy as np

from hybrid_ct.data.slice_store import SliceSet
from hybrid_ct.train.scoring import evaluate

PENDING = "pending"
GATE_MAX_SLICES = 128  # judging scores two models: evenly spaced slices bound its time on a whole new scan


def gate_params(req: dict) -> tuple:
    """A train request -> (promote_metrics, promote_tolerance), with their defaults."""
    return req.get("promote_metrics") or ["score"], float(req.get("promote_tolerance") or 0.0)


def pending_candidate(store) -> str | None:
    """The newest version when it waits for its judgement (``pending``) and is not served, else None."""
    versions = store.versions()
    if not versions:
        return None
    last = versions[-1]
    if (last.get("promotion") or {}).get("decision") != PENDING or last["version"] == store.current():
        return None
    return last["version"]


def unseen_cases(datalist: list, *metas: dict) -> list:
    """The labelled cases none of the models behind ``metas`` (sidecars with ``trained_ids``) trained on."""
    seen = set()
    for meta in metas:
        seen.update(meta.get("trained_ids") or [])
    return [c for c in datalist if c["id"] not in seen]


def evenly(data: SliceSet, n: int = GATE_MAX_SLICES) -> SliceSet:
    """At most ``n`` evenly spaced slices of ``data`` (all of them when there are fewer)."""
    if len(data) <= n:
        return data
    return data.subset(np.unique(np.linspace(0, len(data) - 1, n).round().astype(int)))


def promotion_scores(model, data: SliceSet, device, batch_size: int) -> dict:
    """``evaluate`` on ``data`` -> the ``PROMOTE_METRICS`` these slices can measure (rounded as in train_stats)."""
    ev = evaluate(model.to(device), data, batch_size, device)
    return {"score": round(float(ev["score"]), 5), **flat_metrics(ev)}


def promotion_decision(new: dict, served: dict | None, metrics: list, tolerance: float = 0.0,
                       force: bool = False) -> tuple:
    """-> (decision, reason). "promoted": ``new`` is not worse than ``served`` on any of ``metrics``
    (new >= served - tolerance), or there is no served model; else "forced" with ``force``, else "kept".
    A metric without a served value (these slices cannot measure it) is not compared; when none of
    ``metrics`` can be, the validation ``score`` is."""
    if served is None:
        return "promoted", "no served model"
    compared = [m for m in metrics if served.get(m) is not None]
    skipped = [m for m in metrics if m not in compared]
    if not compared:
        compared = ["score"]
    note = f" ({', '.join(skipped)} not measurable on these slices)" if skipped else ""
    worse = [m for m in compared if new.get(m) is None or round(served[m] - new[m], 6) > tolerance]
    if not worse:
        return "promoted", "not worse than the served model: " + ", ".join(
            f"{m} {new[m]} vs {served[m]}" for m in compared) + f" (tolerance {tolerance}){note}"
    why = "worse than the served model on " + ", ".join(f"{m} ({new.get(m)} < {served[m]} - {tolerance})"
                                                         for m in worse) + note
    if force:
        return "forced", why + "; made current by force_promote"
    return "kept", why + "; the served model stays current"


def flat_metrics(ev: dict) -> dict:
    out = {}
    for name, m in (ev.get("seg") or {}).items():
        if isinstance(m, dict) and m.get("n_cases"):
            for k in ("dice", "iou"):
                if k in m and m[k] == m[k]:
                    out[f"{name}_{k}"] = round(float(m[k]), 5)
    for k in ("accuracy", "auc", "sensitivity", "specificity"):
        v = (ev.get("cls") or {}).get(k)
        if isinstance(v, (int, float)) and v == v:
            out[f"cls_{k}"] = round(float(v), 5)
    return out
