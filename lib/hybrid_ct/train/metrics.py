"""Metrics: segmentation (monai confusion-matrix metrics) and classification (scikit-learn)."""
from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from hybrid_ct.contract import SEG_HEADS

SEG_CLASSES = dict(SEG_HEADS)  # label values making up each evaluated class: the segmentation heads' targets
_SEG_METRICS = {"dice": "f1 score", "iou": "threat score", "sensitivity": "sensitivity",
                "specificity": "specificity", "precision": "precision"}


def class_masks(label: np.ndarray | torch.Tensor, classes: dict = SEG_CLASSES) -> dict:
    """Label map (contract values) -> {class name: bool mask}."""
    lab = torch.as_tensor(np.asarray(label))
    return {name: torch.isin(lab, torch.tensor(values)) for name, values in classes.items()}


class SegmentationMeter:
    """Accumulates per-class confusion counts over many cases (micro average) and per-case Dice."""

    def __init__(self, classes: dict = SEG_CLASSES):
        self.classes = classes
        self.cm = {name: torch.zeros(4, dtype=torch.float64) for name in classes}
        self.case_dice = {name: [] for name in classes}

    def update(self, pred_label, true_label) -> dict:
        pm, tm = class_masks(pred_label, self.classes), class_masks(true_label, self.classes)
        case = {}
        for name in self.classes:
            p = pm[name].reshape(1, 1, -1).float()
            t = tm[name].reshape(1, 1, -1).float()
            cm = get_confusion_matrix(p, t).reshape(4).double()  # tp, fp, tn, fn
            self.cm[name] += cm
            if t.sum() > 0 or p.sum() > 0:
                d = float(compute_confusion_matrix_metric("f1 score", cm.reshape(1, 4)))
                self.case_dice[name].append(d)
                case[name] = d
        return case

    def compute(self) -> dict:
        res = {}
        for name, cm in self.cm.items():
            row = {k: float(compute_confusion_matrix_metric(m, cm.reshape(1, 4))) for k, m in _SEG_METRICS.items()}
            row["dice_per_case_mean"] = float(np.mean(self.case_dice[name])) if self.case_dice[name] else float("nan")
            row["n_cases"] = len(self.case_dice[name])
            res[name] = row
        return res


def segmentation_metrics(pred_label, true_label, classes: dict = SEG_CLASSES) -> dict:
    m = SegmentationMeter(classes)
    m.update(pred_label, true_label)
    return m.compute()


def classification_metrics(y_true, score, threshold: float = 0.5, y_pred=None) -> dict:
    """Accuracy, sensitivity, specificity, F1 and AUC (+ ROC points) for binary labels (1 = positive)."""
    y_true = np.asarray(y_true).astype(int)
    score = np.asarray(score, dtype=float)
    y_pred = (score >= threshold).astype(int) if y_pred is None else np.asarray(y_pred).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    fpr, tpr, thr = roc_curve(y_true, score) if both else (np.array([]), np.array([]), np.array([]))
    return {
        "n": int(len(y_true)), "positives": int(y_true.sum()),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "auc": float(roc_auc_score(y_true, score)) if both else float("nan"),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()},
    }


def sensitivity_at_specificity(y_true, score, min_specificity: float = 0.85) -> dict:
    """The operating point read off the ROC: the highest sensitivity among the thresholds whose
    specificity is at least ``min_specificity`` (a slice is positive when ``score >= threshold``).
    -> {"sensitivity", "specificity", "threshold"} (NaN without both classes)."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=float)
    nan = {"sensitivity": float("nan"), "specificity": float("nan"), "threshold": float("nan")}
    if len(np.unique(y)) < 2:
        return nan
    fpr, tpr, thr = roc_curve(y, s)
    ok = np.flatnonzero(1 - fpr >= min_specificity - 1e-12)
    i = ok[np.argmax(tpr[ok])]  # roc_curve's first point (threshold inf) has fpr 0: ok is never empty
    return {"sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i]), "threshold": float(thr[i])}


def rates_at_threshold(y_true, score, threshold: float) -> dict:
    """Sensitivity and specificity of ``score >= threshold`` (NaN for a class that is absent)."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(score, dtype=float) >= threshold
    pos, neg = y == 1, y == 0
    return {"sensitivity": float(p[pos].mean()) if pos.any() else float("nan"),
            "specificity": float((~p[neg]).mean()) if neg.any() else float("nan"), "threshold": float(threshold)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    den = a.sum() + b.sum()
    return float(2 * (a & b).sum() / den) if den else 1.0
