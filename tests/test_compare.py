"""Side-by-side tables of evaluated builds (hybrid_ct.evaluate.compare) and the grid override of `hybrid-ct train`."""
import json

import pytest

from hybrid_ct.evaluate import compare
from hybrid_ct.errors import InputError
from hybrid_ct.train.recipes import resolve_recipe


def _res(lung, inf, auc):
    return {"hybrid": {"seg": {"lung/real-expert": {"dice": lung}, "infection/medseg": {"dice_per_case_mean": inf}},
                       "cls": {"real": {"auc": auc}},
                       "scan": {"nsclc_lung1_001": {"lung_dice": lung - 0.1}}}}


def test_side_by_side_table_and_plot(tmp_path, capsys):
    paths = []
    for size, r in ((128, _res(0.9, 0.5, 0.7)), (192, _res(0.95, 0.6, 0.8))):
        p = tmp_path / f"{size}.json"
        p.write_text(json.dumps(r))
        paths.append(f"{size}={p}")
    out = tmp_path / "grid.md"
    assert compare.main(["--out", str(out), "--title", "Grid", "--plot", str(tmp_path / "img" / "g.png"),
                         "--xlabel", "grid", *paths]) == 0
    text = out.read_text()
    assert text.startswith("# Grid") and "| number | 128 | 192 |" in text
    assert "| infection Dice, MedSeg mean per slice | 0.500 | 0.600 |" in text
    assert "| validation composite | 0.700 | 0.783 |" in text
    assert "P001" not in text  # numbers no build has are left out
    assert (tmp_path / "img" / "g.png").stat().st_size > 1000 and "](img/g.png)" in text
    with pytest.raises(SystemExit):
        compare.main(["no-equals-sign"])


def test_grid_override_is_checked():
    assert resolve_recipe("shipped", in_size=192)["net"]["in_size"] == 192
    with pytest.raises(InputError, match="multiple of 16"):
        resolve_recipe("shipped", in_size=200)


def test_fine_tune_epochs_override():
    assert resolve_recipe("shipped", fine_tune_epochs=1)["train"]["from_twin"]["epochs"] == 1
    assert resolve_recipe("shipped")["train"]["from_twin"]["epochs"] == 3  # the override does not leak


def test_a_column_can_be_the_twin_of_an_evaluation(tmp_path, capsys):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"hybrid": _res(0.8, 0.4, 0.6)["hybrid"], "twin": _res(0.9, 0.5, 0.7)["hybrid"]}))
    assert compare.main([f"hybrid={p}", f"twin={p}#twin"]) == 0
    assert "| lung Dice, expert masks (validation slices) | 0.800 | 0.900 |" in capsys.readouterr().out
