"""The three-seed build: the spread table and the median pick (hybrid_ct.evaluate.seeds), on hand-made results."""
import json

import pytest

from hybrid_ct.evaluate import seeds


def _result(lung, inf, auc, p001=0.9):
    r = {"seg": {"lung/real-expert": {"dice": lung}, "infection/medseg": {"dice_per_case_mean": inf}},
         "cls": {"real": {"auc": auc, "sensitivity": 0.5, "specificity": 0.9}},
         "energy": {"ratio": 0.2, "mean_firing_rate": 0.3},
         "scan": {"P001": {"probability": p001, "agreement": {"segmentation": {"kappa": 0.5}}}}}
    return {"hybrid": r, "twin": r}


@pytest.fixture
def runs(tmp_path):
    for s, r in {0: _result(0.90, 0.50, 0.80), 1: _result(0.95, 0.60, 0.90, p001=0.1), 2: _result(0.80, 0.40, 0.70)}.items():
        (tmp_path / f"seed{s}").mkdir()
        (tmp_path / f"seed{s}" / "results.json").write_text(json.dumps(r))
    return tmp_path


def test_the_median_build_is_shipped_not_the_best(runs):
    loaded = seeds.load_runs(runs)
    assert seeds.median_seed(loaded) == 0  # composites 0.733 (seed 0) < 0.817 (seed 1, the best): the middle one
    assert seeds.median_seed({k: loaded[k] for k in (1, 2)}) == 2  # even count: the lower middle


def test_spread_table_has_mean_and_range_per_number(runs, capsys):
    (runs / "previous.json").write_text(json.dumps(_result(0.7, 0.3, 0.6, p001=0.99)))
    out = runs / "seeds.md"
    assert seeds.main(["--runs", str(runs), "--out", str(out), "--print-median", "--previous", str(runs / "previous.json")]) == 0
    assert capsys.readouterr().out.strip() == "0"
    text = out.read_text()
    assert "seed 0 (shipped)" in text and "## CNN twin" in text
    row = next(line for line in text.splitlines() if line.startswith("| P001 P(positive)"))
    assert "0.633" in row and "0.100 – 0.900 (0.800)" in row  # mean and range over the three seeds
    assert row.endswith("| 0.990 |") and "previous shipped model" in text
    assert "n/a" in next(line for line in text.splitlines() if line.startswith("| normal001 P(positive)"))


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no seed"):
        seeds.load_runs(tmp_path)


def test_ship_copies_the_median_evaluation_with_the_spread(runs, tmp_path):
    (runs / "seed0" / "results.md").write_text("# Results\n\n![roc](img/roc.png)\n")
    (runs / "seed0" / "img").mkdir()
    (runs / "seed0" / "img" / "roc.png").write_bytes(b"png")
    docs = tmp_path / "docs"
    assert seeds.main(["--runs", str(runs), "--out", str(runs / "seeds.md"), "--ship", str(docs / "results.md")]) == 0
    text = (docs / "results.md").read_text()
    assert text.startswith("# Results") and "Run-to-run spread over seeds" in text and "seed 0 (shipped)" in text
    assert (docs / "img" / "roc.png").read_bytes() == b"png"  # the relative figure links still hold


def _scans(**calls):
    return {name: {"truth": truth, "call": call} for name, (truth, call) in calls.items()}


def test_a_median_worse_than_the_shipped_model_is_not_shipped(runs, tmp_path, capsys):
    """The gate: the median build (seed 0) loses 0.07 lung Dice and one whole-scan call against the model
    shipped before -> the previous model stays; docs/results.md becomes ITS evaluation, with the spread."""
    prev = _result(0.97, 0.50, 0.80)
    prev["hybrid"]["scan"] = _scans(P001=("positive", "positive"), normal001=("negative", "negative"))
    med = json.loads((runs / "seed0" / "results.json").read_text())
    med["hybrid"]["scan"] = _scans(P001=("positive", "negative"), normal001=("negative", "negative"))
    (runs / "seed0" / "results.json").write_text(json.dumps(med))
    ok, worse = seeds.gate(med, prev)
    assert not ok and any("lung Dice" in w for w in worse) and any("called right 1 < 2" in w for w in worse)
    (runs / "previous").mkdir()
    (runs / "previous" / "results.json").write_text(json.dumps(prev))
    (runs / "previous" / "results.md").write_text("# Results of the shipped model\n")
    docs = tmp_path / "docs"
    assert seeds.main(["--runs", str(runs), "--out", str(runs / "seeds.md"), "--previous",
                       str(runs / "previous" / "results.json"), "--ship", str(docs / "results.md"), "--print-median"]) == 0
    assert capsys.readouterr().out.strip() == "previous"
    text = (docs / "results.md").read_text()
    assert text.startswith("# Results of the shipped model") and "did not pass" in text
    assert "seed 0 (median, not shipped)" in text and "is NOT shipped" in (runs / "seeds.md").read_text()


def test_a_median_as_good_as_the_shipped_model_ships(runs):
    med = json.loads((runs / "seed0" / "results.json").read_text())
    assert seeds.gate(med, _result(0.905, 0.50, 0.80)) == (True, [])  # 0.005 lower: within the tolerance
    assert seeds.gate(med, None) == (True, [])
