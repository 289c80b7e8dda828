"""``bench_active_learning.py --initial shipped`` wired without the long campaign (which needs ~10 min a round on
2 cores): the scale it picks, the checkpoint and conf the server would start with, a finished run reused from the
--workdir, and the doc written for it (docs/active_learning.md's writer)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import al_pools  # noqa: E402
import bench_active_learning as bench  # noqa: E402


def test_tiny_default_unchanged_and_shipped_scale():
    tiny = bench.parse_args([])
    assert (tiny.initial, tiny.pool, tiny.test, tiny.shape, tiny.real_max_slices) == ("tiny", 8, 6, "16,64,64", 48)
    assert tiny.json.endswith("docs/active_learning_tiny.json") and tiny.doc.endswith("docs/active_learning_tiny.md")
    assert tiny.notes.endswith("benchmarks/al_notes_tiny.md")
    shipped = bench.parse_args(["--initial", "shipped"])
    assert (shipped.pool, shipped.test, shipped.shape, shipped.real_max_slices) == (4, 2, "48,256,256", 0)
    assert shipped.doc.endswith("docs/active_learning.md") and shipped.notes.endswith("benchmarks/al_notes.md")
    assert bench.parse_args(["--initial", "shipped", "--pool", "1", "--doc", ""]).pool == 1  # explicit wins
    # the shipped model trained on imlab id002: its test pool must hold id001 (its validation scan), not id002
    assert bench.SCALES["shipped"]["test_real"] == ("imlab_id001",)
    assert "imlab_id001" not in bench.SCALES["shipped"]["pool_real"]
    assert bench.SCALES["tiny"]["test_real"] == al_pools.TEST_REAL == ("imlab_id002",)


def test_shipped_server_starts_from_the_package_checkpoint(tmp_path, monkeypatch):
    from hybrid_ct.net.model_files import default_model_path

    args = bench.parse_args(["--initial", "shipped", "--rounds", "1"])
    path, info, replay = bench.initial_model("shipped", tmp_path, 0, None, args)
    assert Path(path) == default_model_path() and info["net"]["in_size"] == 128 and info["kind"] == "shipped"
    assert replay == info["replay"]  # None unless the package ships <model>.replay.npz
    assert not list(tmp_path.iterdir())  # nothing trained

    img, lab, _ = al_pools.hard_phantom("phantom", 3, (4, 32, 32), True)
    pools = {"pool": [al_pools.Case("scan_00", "phantom", img, lab, True, {"source_id": "p00"})], "test": []}
    seen = {}

    def fake_start(workdir, conf=None, model=None, studies_writer=None, **kw):
        studies_writer(workdir / "studies")
        seen.update(conf=conf, model=model, studies=sorted(p.name for p in (workdir / "studies").iterdir()))
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench.sf, "start_server", fake_start)
    with pytest.raises(RuntimeError, match="stop here"):
        bench.run_one("random", 0, pools, args, tmp_path / "random_s0", Path(path), replay)
    assert seen["model"] == Path(path) and seen["studies"] == ["scan_00.nii.gz"]  # the label stays hidden
    assert ("replay" in seen["conf"]) == (replay is not None)
    assert seen["conf"]["auto_train_after"] == "1" and json.loads(seen["conf"]["auto_train_params"]) == {"seed": 0}


def _test(dice, fi):
    return {"dice": dice, "lung_dice": dice, "infection_dice": dice, "false_infection_ml": fi,
            "scan_call_accuracy": 0.5, "real_lung_dice": dice, "per_scan": []}


def test_a_finished_run_is_reused_and_the_shipped_doc_written(tmp_path):
    work, js, doc, png = tmp_path / "work", tmp_path / "al.json", tmp_path / "al.md", tmp_path / "al.png"
    argv = ["--initial", "shipped", "--strategies", "random", "--seeds", "0", "--rounds", "1", "--no-real",
            "--pool", "1", "--test", "1", "--shape", "4,32,32", "--workdir", str(work), "--json", str(js),
            "--doc", str(doc), "--png", str(png)]
    run = {"strategy": "random", "seed": 0, "complete": True, "startup_s": 12.0, "rounds": [
        {"round": 0, "corrections": 0, "version": "shipped", "test": _test(0.5, 40.0), "test_s": 100.0},
        {"round": 1, "corrections": 1, "version": "v1", "test": _test(0.55, 30.0), "test_s": 110.0,
         "picks": [{"id": "scan_00", "kind": "phantom", "positive": True, "source": "p00"}],
         "round_s": 290.0, "epoch_s": [100.0, 90.0], "breakdown": {"to_start_s": 5.0, "train_s": 225.0,
                                                                    "gate_publish_s": 60.0},
         "retrain": {"status": "DONE", "published_version": "v1", "epoch": 2,
                     "time_budget": {"hit": True, "train_s": 225.0}},
         "gate": {"decision": "promoted", "new": {"score": 0.6}, "served": {"score": 0.5}, "val_images": 0,
                  "val_on_training_set": True}}]}
    work.mkdir()
    (work / "random_s0.json").write_text(json.dumps({"key": bench.run_key(bench.parse_args(argv), "random", 0),
                                                     "run": run}))
    assert bench.main(argv) == 0  # reused: no server, no test scoring
    out = json.loads(js.read_text())
    assert out["runs"] == [run] and out["settings"]["initial"] == "shipped"
    assert out["pools"]["0"]["initial_model"]["kind"] == "shipped"
    text = doc.read_text(encoding="utf-8")
    assert "the shipped network" in text and "One seed: this is not a strategy comparison" in text
    assert "where a round's time went" in text and "225 s training" in text and "40.0 -> 30.0" in text
    assert "290.0 (5 + 225 + 60)" in text and "median 290 s, max 290 s" in text


def test_strategies_are_compared_with_random_seed_by_seed():
    import al_report

    def run(strategy, seed, dices):
        return {"strategy": strategy, "seed": seed, "rounds": [
            {"round": i, "corrections": i, "test": {"dice": d}} for i, d in enumerate(dices)]}

    out = {"runs": [run("uncertainty", 0, [0.6, 0.7, 0.5]), run("random", 0, [0.6, 0.6, 0.6]),
                    run("uncertainty", 1, [0.5, 0.55, 0.6]), run("random", 1, [0.5, 0.5, 0.4]),
                    run("uncertainty", 2, [0.4, 0.4, 0.4])]}  # seed 2 has no random run: left out
    xs, diff = al_report.paired(out, "uncertainty")
    assert xs == [0, 1, 2] and diff.shape == (2, 3)
    assert np.allclose(diff, [[0.0, 0.1, -0.1], [0.0, 0.05, 0.2]])
    text = "\n".join(al_report._paired_lines(out, ["uncertainty", "random"]))
    assert "+0.075 [+0.050–+0.100]" in text and "+0.050 [-0.100–+0.200]" in text
    assert "at every round (mean over seeds): yes; below random in 1 of 4 (seed, round) pairs" in text
    out["runs"][2]["rounds"][2]["test"]["dice"] = 0.45  # seed 1 leads by less: the mean falls below
    text = "\n".join(al_report._paired_lines(out, ["uncertainty", "random"]))
    assert "no, below after 2 correction(s); below random in 1 of 4" in text
    assert al_report.paired(out, "first") is None
