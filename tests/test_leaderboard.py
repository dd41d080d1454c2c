"""The leaderboard across studies on tiny data: each study's best and the baseline's, the same
seeds and budget, ranked, with family-wise intervals; runs reused; other budgets refused."""

import pandas as pd
import pytest
from test_search import options

from clipse.leaderboard import LeaderboardOptions, run_leaderboard
from clipse.leaderboard import main as leaderboard_main
from clipse.search import run_search
from clipse.util.errors import UserError


@pytest.fixture(autouse=True)
def _run_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
def test_a_leaderboard_ranks_each_studys_best_against_the_baseline(tmp_path, capsys):
    for space in ("baseline", "debias", "bandpass"):
        run_search(options(tmp_path, space, 1, training={"epochs": 1}, pruner="none", min_weight_std=0.0))
    board = LeaderboardOptions(studies="debias, bandpass", studies_dir=tmp_path / "studies", seeds=2, resamples=50)
    result = run_leaderboard(board)
    table = result.table
    assert list(table["rank"]) == [1, 2, 3] and list(table["r1_mean"]) == sorted(table["r1_mean"], reverse=True)
    assert set(table["configuration"]) == {"baseline", "debias-trial-0", "bandpass-trial-0"}
    by = table.set_index("configuration")
    assert pd.isna(by.loc["baseline", "diff"]) and not pd.isna(by.loc["debias-trial-0", "diff"])
    text = result.files["leaderboard_md"].read_text()
    assert "97.5% interval" in text and "Bonferroni for 2 comparisons" in text
    assert result.files["leaderboard_png"].is_file()
    runs = pd.read_csv(result.files["runs"])
    assert len(runs) == 6 and set(runs["seed"]) == {0, 1}
    registry = (tmp_path / "studies" / "run_registry.csv").read_text().count("leaderboard")
    # again: every run is reused, nothing trained twice
    assert leaderboard_main(["--studies", "debias,bandpass", "--studies-dir", str(tmp_path / "studies"), "--seeds", "2",
                             "--resamples", "50"]) == 0
    assert "# Leaderboard 'leaderboard'" in capsys.readouterr().out
    assert (tmp_path / "studies" / "run_registry.csv").read_text().count("leaderboard") == registry


@pytest.mark.slow
def test_studies_of_another_budget_are_refused(tmp_path):
    run_search(options(tmp_path, "baseline", 1, training={"epochs": 1}, pruner="none"))
    run_search(options(tmp_path, "debias", 1, training={"epochs": 2}, pruner="none", min_weight_std=0.0))
    with pytest.raises(UserError, match="^study 'debias' was made on other data or with another budget than "
                                        r"'baseline' \(epochs\)"):
        run_leaderboard(LeaderboardOptions(studies="debias", studies_dir=tmp_path / "studies", seeds=1))
    with pytest.raises(UserError, match="is the baseline study"):
        run_leaderboard(LeaderboardOptions(studies="baseline", studies_dir=tmp_path / "studies"))
