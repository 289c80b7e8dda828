"""The one label and report contract (lib/hybrid_ct/contract.json) and everyone who reads it agree:
the core, the MONAI Label app, the plots, the report and the Slicer extension (through its copy)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from hybrid_ct import LABELS
from hybrid_ct import contract
from hybrid_ct_slicer import results, segments

ROOT = Path(__file__).resolve().parents[1]
CORE_FILE = ROOT / "lib" / "hybrid_ct" / "contract.json"
SLICER_FILE = ROOT / "slicer_extension" / "hybrid_ct_slicer" / "contract.json"
APP_DIR = ROOT / "apps" / "hybrid_ct"


def test_slicer_copy_is_byte_identical():
    assert SLICER_FILE.read_bytes() == CORE_FILE.read_bytes(), (
        "slicer_extension/hybrid_ct_slicer/contract.json differs from lib/hybrid_ct/contract.json: "
        "edit the core file, then cp lib/hybrid_ct/contract.json slicer_extension/hybrid_ct_slicer/contract.json")


def test_core_values():
    assert LABELS is contract.LABELS
    assert LABELS == {"background": 0, "lung": 1, "right_lung": 3, "left_lung": 4, "infection": 2}
    assert contract.FOREGROUND == {"lung": 1, "right_lung": 3, "left_lung": 4, "infection": 2}
    assert contract.PREDICTED == {"right_lung": 3, "left_lung": 4, "infection": 2}
    assert list(contract.FOREGROUND)[-1] == "infection"  # drawn last: it wins over any lung where segments overlap
    assert set(contract.COLORS) == set(contract.SEGMENT_NAMES) == set(contract.FOREGROUND)
    assert contract.SIDES == {"right": 3, "left": 4} and contract.PARENCHYMA == (1, 3, 4)
    # the sided lungs are the derived head's labels, and the lung head trains on every lung value
    assert contract.HEADS["lung_sides"]["kind"] == "derived"
    assert [LABELS[x] for x in contract.HEADS["lung_sides"]["labels"]] == list(contract.SIDES.values())
    assert set(contract.SEG_HEADS["lung"]) == set(contract.FOREGROUND.values())


def test_app_reads_the_contract(tmp_path):
    pytest.importorskip("monailabel")
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib import validation
    from lib.configs.hybrid_ct import HybridCT

    task = HybridCT()
    task.init("hybrid_ct", str(tmp_path), {})
    assert task.labels == contract.FOREGROUND
    assert task.infer()["hybrid_ct"].labels == contract.PREDICTED  # what a prediction holds
    assert task.label_colors == contract.COLORS
    assert validation.canonical_name is contract.canonical_name


def test_slicer_segments_match_the_core():
    core = {d["value"]: d for d in contract.CONTRACT["labels"] if d["value"]}
    assert [d["idx"] for d in segments.ALL_LABEL_INFO] == list(core)  # the contract's drawing order
    assert [d["server_name"] for d in segments.LABEL_INFO] == list(contract.PREDICTED)
    for d in segments.ALL_LABEL_INFO:
        c = core[d["idx"]]
        assert d["server_name"] == c["name"] and d["name"] == contract.SEGMENT_NAMES[c["name"]]
        assert d["color"] == contract.COLORS[c["name"]]
        assert list(d["category"]) == c["category"] and list(d["type"]) == c["type"]
        assert (list(d["type_modifier"]) if d["type_modifier"] else None) == c["type_modifier"]
        assert (list(d["anatomic_region"]) if d["anatomic_region"] else None) == c["anatomic_region"]
    assert segments.server_label_names() == contract.FOREGROUND
    # every synonym means the same label on both sides (the server and the Slicer module)
    for d in contract.CONTRACT["labels"]:
        for name in [d["name"], *d["synonyms"]]:
            assert contract.canonical_name(name) == d["name"]
            expected = contract.SEGMENT_NAMES.get(d["name"])  # background is no segment
            assert segments.canonical_segment_name(name) == expected, name
    assert contract.canonical_name("COVID-19") == "infection" and contract.canonical_name("heart") is None


def test_terminology_entries():
    for name in contract.SEGMENT_NAMES.values():
        entry = segments.terminology_entry(name)
        assert len(entry.split("~")) == 7 and not entry.endswith("|")
    assert "52988006" not in segments.terminology_entry("Infection")  # "Lesion": in no list Slicer ships
    # the sided lungs: Lung with the laterality modifier (Slicer's DICOM master list: Lung's modifiers Right / Left)
    assert "~SCT^39607008^Lung~SCT^24028007^Right~" in segments.terminology_entry("Right lung")
    assert "~SCT^39607008^Lung~SCT^7771000^Left~" in segments.terminology_entry("Left lung")
    assert "~SCT^39607008^Lung~^^~" in segments.terminology_entry("Lung")


def test_plots_use_the_contract_colours():
    from hybrid_ct.predict import overlays as plots
    for colour, name in ((plots.LUNG_COLOR, "lung"), (plots.INFECTION_COLOR, "infection")):
        assert tuple(round(255 * c) for c in colour) == contract.COLORS[name]


def test_report_keys_produced_and_read():
    from hybrid_ct.processing.burden import infection_burden, severity_grade
    label = np.zeros((4, 16, 16), np.uint8)
    label[:, 4:12, 2:7] = 1
    label[:, 4:12, 9:14] = 2
    burden = infection_burden(label)
    assert tuple(burden) == contract.BURDEN_KEYS
    assert set(results.GRADE_TEXT) == {severity_grade(p) for p in (0, 10, 30, 60, 90)}
    key = contract.report_key
    report = {key("keys", "classification"): {"label": "positive", "probability": 0.9},
              key("keys", "burden"): burden, key("keys", "grade"): severity_grade(burden["total_pct"]),
              key("keys", "energy"): {key("energy", k): v for k, v in zip(contract.REPORT["energy"], (1.0, 4.0, 0.25, 0.05))},
              key("keys", "latency_s"): 1.5, key("keys", "model_version"): "v1"}
    assert results.NA not in results.format_results(report).values()


def test_one_label_table():
    """No source file outside the contract spells a label colour, a terminology code or the synonyms."""
    patterns = [r"197\s*,\s*165\s*,\s*145", r"128\s*,\s*174\s*,\s*128", r"241\s*,\s*196\s*,\s*15", r"[\"'](52988006|23583003|39607008|"
                r"123037004|49755003|24028007|7771000)[\"']", r"[\"']ground glass opacity[\"']", r"[\"']lung parenchyma[\"']"]
    hits = []
    for base in ("lib", "apps", "slicer_extension", "scripts"):
        for path in (ROOT / base).rglob("*.py"):
            text = path.read_text(encoding="utf-8", errors="replace")
            hits += [f"{path.relative_to(ROOT)}: {p}" for p in patterns if re.search(p, text)]
    assert not hits, hits


def test_report_keys_are_read_by_name():
    """A key added to the contract's report moves no reader: nothing unpacks a report section by position."""
    import re
    from pathlib import Path

    from hybrid_ct.contract import report_key

    assert report_key("burden", "total_pct") == "total_pct"
    with pytest.raises(KeyError):
        report_key("burden", "no_such_key")
    root = Path(__file__).resolve().parents[1]
    positional = re.compile(r"^\s*\w+(\s*,\s*\w+)+\s*=\s*(_?REPORT\[|BURDEN_KEYS|REPORT_KEYS)", re.M)
    offenders = [str(p.relative_to(root)) for folder in ("lib", "apps", "slicer_extension")
                 for p in (root / folder).rglob("*.py") if positional.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"report keys unpacked by position in {offenders}"
