"""Infer result params (the report dict of docs/CONTRACTS.md) -> text for the results panel.

Every function is total: missing keys, ``None`` and wrongly typed values give "n/a" rather than an
exception, because an older or newer server may send a different set of keys.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .segments import CONTRACT

NA = "n/a"

# Report keys and grades: the project's contract (contract.json, see segments.py).
_REPORT = CONTRACT["report"]


def _keys(section: str, *names: str) -> tuple:
    """Report keys by name, checked against the contract (never by position: a key the server adds moves none)."""
    known = _REPORT[section]
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"contract.json's report {section!r} has no {missing}")
    return names if len(names) > 1 else names[0]


CLASSIFICATION, BURDEN, GRADE, ENERGY, LATENCY_S, MODEL_VERSION = _keys(
    "keys", "classification", "burden", "grade", "energy", "latency_s", "model_version")
LABEL, PROBABILITY, CALIBRATED, INFECTION_FOUND, FINDING = _keys(
    "classification", "label", "probability", "calibrated", "infection_found", "finding")
TOTAL_PCT, LEFT_PCT, RIGHT_PCT = _keys("burden", "total_pct", "left_pct", "right_pct")
E_HYBRID_UJ, E_CONV_UJ, RATIO, MEAN_FIRING_RATE = _keys("energy", "e_hybrid_uj", "e_conv_uj", "ratio", "mean_firing_rate")
GRADE_TEXT = {grade: f"{grade} ({meaning})" for grade, meaning in _REPORT["grades"].items()}
# the combined call's wording and the lung density guard (absent from older servers' reports)
CALL_TEXT = _REPORT.get("call", {}).get("key", "call_text")
LUNG_DENSITY = _REPORT.get("lung_density", {}).get("key", "lung_density")
MEDIAN_HU, _MAX_MEDIAN_HU, DENSITY_WARNING = _REPORT.get("lung_density", {}).get(
    "fields", ["median_hu", "max_median_hu", "warning"])

#: Keys of :func:`format_results`, in display order, with their labels.
RESULT_FIELDS = (
    ("classification", "Classification"),
    ("burden", "Infection burden"),
    ("grade", "Severity grade"),
    ("energy", "Energy (hybrid / CNN)"),
    ("model_version", "Model version"),
    ("latency", "Inference time"),
)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _dict(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def report_from_params(params: Any) -> Mapping:
    """The report dict, whether the server put it at the top level or under ``"report"``/``"result"``."""
    p = _dict(params)
    if CLASSIFICATION in p or BURDEN in p:
        return p
    for key in ("report", "result", "hybrid_ct"):
        inner = _dict(p.get(key))
        if inner:
            merged = dict(p)
            merged.update(inner)
            return merged
    return p


def _pct(x: float | None) -> str:
    return NA if x is None else f"{x:.1f} %"


def format_classification(report: Mapping) -> str:
    cls = _dict(report.get(CLASSIFICATION))
    label = cls.get(LABEL)
    prob = _num(cls.get(PROBABILITY))
    if not isinstance(label, str) or not label.strip():
        if prob is None:
            return NA
        label = "positive" if prob >= 0.5 else "negative"
    label = label.strip().lower()
    text = label.capitalize()
    if prob is not None:
        prob = min(max(prob, 0.0), 1.0)
        # probability is that of the POSITIVE class (CONTRACTS.md); an uncalibrated one is only a score
        text += f" (P(positive) = {prob:.2f})" if cls.get(CALIBRATED, True) is not False else \
            f" (score {prob:.2f}, not calibrated)"
    call_text = cls.get(CALL_TEXT)
    if isinstance(call_text, str) and call_text.strip():
        call_text = call_text.strip()
        if call_text.lower().startswith(label + ":"):  # "indeterminate: ..." -> the reason only
            call_text = call_text[len(label) + 1:].strip()
        text += f" - {call_text}"
    return text


def format_burden(report: Mapping) -> str:
    b = _dict(report.get(BURDEN))
    total, left, right = _num(b.get(TOTAL_PCT)), _num(b.get(LEFT_PCT)), _num(b.get(RIGHT_PCT))
    if total is None and left is None and right is None:
        return NA
    text = f"{_pct(total)} of lung"
    if left is not None or right is not None:
        text += f" (left {_pct(left)}, right {_pct(right)})"
    if _dict(report.get(CLASSIFICATION)).get(INFECTION_FOUND) is False:  # below the noise floor
        text += " - no infection found"
    density = _dict(report.get(LUNG_DENSITY))
    median = _num(density.get(MEDIAN_HU))
    if median is not None:
        text += f"; lung parenchyma median {median:.0f} HU"
        warning = density.get(DENSITY_WARNING)
        if isinstance(warning, str) and warning.strip():
            text += f" - WARNING: {warning.strip()}"
        note = density.get("note")  # the standardisation the server applied before the network (newer servers)
        if isinstance(note, str) and note.strip():
            text += f" ({note.strip()})"
    return text


def format_grade(report: Mapping) -> str:
    grade = report.get(GRADE)
    if not isinstance(grade, str) or not grade.strip():
        return NA
    grade = grade.strip().upper()
    return GRADE_TEXT.get(grade, grade)


def format_energy(report: Mapping) -> str:
    e = _dict(report.get(ENERGY))
    ratio = _num(e.get(RATIO))
    hyb, conv = _num(e.get(E_HYBRID_UJ)), _num(e.get(E_CONV_UJ))
    if ratio is None and hyb is not None and conv:
        ratio = hyb / conv
    if ratio is None:
        return NA
    text = f"{ratio:.3f}"
    if ratio < 1:
        text += f" ({(1 - ratio) * 100:.0f} % less than the CNN)"
    elif ratio > 1:
        text += f" ({(ratio - 1) * 100:.0f} % more than the CNN)"
    if hyb is not None and conv is not None:
        text += f"; {hyb:.3g} uJ vs {conv:.3g} uJ"
    rate = _num(e.get(MEAN_FIRING_RATE))
    if rate is not None:
        text += f"; firing rate {rate * 100:.1f} %"
    return text


def format_model_version(report: Mapping) -> str:
    v = report.get(MODEL_VERSION)
    if v is None or (isinstance(v, str) and not v.strip()):
        return NA
    return str(v).strip()


def format_latency(report: Mapping) -> str:
    lat = _num(report.get(LATENCY_S))
    if lat is None:
        lat = _num(_dict(report.get("latencies")).get("total"))
    return NA if lat is None else f"{lat:.1f} s"


def format_results(params: Any) -> dict[str, str]:
    """All panel strings: keys as in :data:`RESULT_FIELDS`."""
    r = report_from_params(params)
    return {
        "classification": format_classification(r),
        "burden": format_burden(r),
        "grade": format_grade(r),
        "energy": format_energy(r),
        "model_version": format_model_version(r),
        "latency": format_latency(r),
    }


def results_text(params: Any) -> str:
    """One line per field, e.g. for a tooltip or the Python console."""
    values = format_results(params)
    return "\n".join(f"{label}: {values[key]}" for key, label in RESULT_FIELDS)


def format_train_status(task: Any, train_stats: Any = None, running: bool | None = None) -> tuple[str, str]:
    """``GET /train/`` task + ``train_stats`` -> (status line, metric line)."""
    t = _dict(task)
    stats = _dict(train_stats)
    status = t.get("status")
    if running is True:
        status_text = "Training: running"
    elif isinstance(status, str) and status:
        status_text = f"Training: {status.lower()}"
    else:
        status_text = "Training: never run on this server" if not t else "Training: unknown"
    start, end = t.get("start_ts"), t.get("end_ts")
    if start and end:
        status_text += f" ({start} - {end})"
    elif start:
        status_text += f" (since {start})"
    details = t.get("details")
    if isinstance(details, (list, tuple)) and details:
        last = str(details[-1]).strip()
        if last:
            status_text += f"\nLast log line: {last[:160]}"
    best = _num(stats.get("best_metric"))
    if best is None:
        metric_text = "Best metric: n/a"
    else:
        metric_text = f"Best metric: {best:.4f}"
        epoch = stats.get("best_metric_epoch")
        if epoch is not None:
            metric_text += f" (epoch {epoch})"
    total = stats.get("total_epochs") or stats.get("epochs")
    cur = stats.get("epoch")
    if cur is not None and total:
        metric_text += f"; epoch {cur}/{total}"
    return status_text, metric_text


def format_version_entry(v: Any, current: str | None = None) -> str:
    d = _dict(v)
    version = str(d.get("version", v if isinstance(v, str) else "?"))
    text = version
    metric = _num(d.get("metric"))
    if metric is not None:
        text += f"  metric {metric:.4f}"
    created = d.get("created")
    if created:
        text += f"  ({created})"
    if current is not None and version == str(current):
        text += "  [current]"
    return text


def result_lines(display: Mapping[str, str]) -> list[str]:
    """The results as text lines, the research-use notice first (status line, logs, rendered pictures)."""
    from .panel import RESEARCH_NOTICE

    return [RESEARCH_NOTICE] + [f"{label}: {display.get(key, NA)}" for key, label in RESULT_FIELDS]
