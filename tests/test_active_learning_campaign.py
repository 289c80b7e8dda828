"""The active-learning campaign (benchmarks/bench_active_learning.py), short: one strategy, 2 rounds, a tiny
pool, through the real server over HTTP; the JSON holds what docs/active_learning.md needs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_campaign_runs_end_to_end_over_http(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_active_learning as bench

    out_json, doc, png = tmp_path / "al.json", tmp_path / "al.md", tmp_path / "al.png"
    rc = bench.main(["--strategies", "uncertainty", "--seeds", "0", "--rounds", "2", "--pool", "3", "--test", "2",
                     "--shape", "8,64,64", "--no-real", "--init-epochs", "2", "--init-phantoms", "2",
                     "--auto-train-params", json.dumps({"max_epochs": 1, "max_minutes": 1, "val_split": 0.0}), "--timeout", "300",
                     "--workdir", str(tmp_path / "work"), "--json", str(out_json), "--doc", str(doc), "--png", str(png)])
    assert rc == 0
    out = json.loads(out_json.read_text())
    assert out["settings"]["strategies"] == ["uncertainty"] and out["pools"]["0"]["pool"]
    (run,) = out["runs"]
    rounds = run["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["corrections"] for r in rounds] == [0, 1, 2]
    picks = [p["id"] for r in rounds[1:] for p in r["picks"]]
    assert len(set(picks)) == 2 and all(p.startswith("scan_") for p in picks)  # each pick annotated once
    for r in rounds:
        t = r["test"]
        assert 0.0 <= t["lung_dice"] <= 1.0 and 0.0 <= t["scan_call_accuracy"] <= 1.0
        assert {"infection_dice", "false_infection_ml", "dice", "per_scan"} <= set(t)
        assert r["version"]
    for r in rounds[1:]:
        assert r["scoring"]["status"] == "DONE" and r["round_s"] > 0
        assert r["auto_train"]["started"], r["auto_train"]  # auto_train_after = 1: every correction retrains
        assert r["retrain"]["status"] == "DONE"  # val_split 0: never a validation-only label
    # nothing held out (val_split 0, no replay share): each retrain is published pending and judged at the next
    # round's start on that round's correction, which neither it nor the served model has trained on
    assert [r["gate"]["decision"] for r in rounds[1:]] == ["pending", "pending"]
    judged = rounds[2]["judged"]
    assert judged["candidate"] == rounds[1]["retrain"]["published_version"] and judged["decision"] in ("promoted", "kept")
    assert judged["judged_on"] == [rounds[2]["picks"][0]["id"]] and 0 < rounds[2]["decision_s"] < rounds[2]["round_s"]
    assert rounds[2]["version"] == (judged["candidate"] if judged["decision"] == "promoted" else rounds[1]["version"])
    for r in rounds[1:]:  # a retrain not served is scored too: the gains the gate blocks are measured
        assert ("test_published" in r) == (r["retrain"]["published_version"] != r["version"]), r.get("gate")
    text = doc.read_text(encoding="utf-8")
    assert "Learning curves" in text and "Annotation saving" in text and "promotion gate" in text
    assert "all strategies: the gate promoted" in text
    assert png.stat().st_size > 1000
