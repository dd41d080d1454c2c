"""The final report on a tiny study created here: every file, numbers that agree with runs.csv,
real images, reuse on re-run, retries of lost runs, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import load_study
from PIL import Image

from analysis.dynamics import main as dynamics_main
from analysis.search_plots import main as plots_main
from analysis.summary import main as summary_main
from clipse.config import TrainConfig
from clipse.evaluation.metrics import METRIC_KEYS, metrics_from_ranks
from clipse.evaluation.statistics import paired_bootstrap
from clipse.executors import DONE, LOST, ExecutorOptions
from clipse.final import FinalOptions, run_final
from clipse.final import main as final_main
from clipse.report.comparison import load_ranks
from clipse.search.command import SearchOptions, run_search
from clipse.search.planned_runs import PlannedRun, RunWorkload

TINY = ["--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12",
        "--batch-size", "16", "--epochs", "2"]
SEARCH_FIGURES = {"search_history": "search_history.png", "param_importances": "param_importances.png",
                  "intermediate_values": "intermediate_values.png", "timeline": "timeline.png",
                  "sanw_slice": "sanw_slice.png"}
WISEFT_FILES = {"wiseft_csv": "wiseft.csv", "wiseft_md": "wiseft.md", "wiseft_plot": "wiseft.png"}
FILES = ["runs.csv", "summary.csv", "summary.md", "dynamics.png", "test_metrics.png", *SEARCH_FIGURES.values(),
         *WISEFT_FILES.values()]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A 3-trial debias study, then `clipse.final --seeds 2 --top-k 2` on it (no baseline study)."""
    root = tmp_path_factory.mktemp("final")
    studies = root / "studies"
    import os
    old = os.getcwd()
    os.chdir(root)
    try:
        training = {"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12,
                    "batch_size": 16, "epochs": 2, "data_root": str(root / "shapes")}
        search = run_search(SearchOptions(space="debias", trials=3, pruner="none", studies_dir=studies,
                                          min_weight_std=0.0, training=training))  # tiny runs barely reweight
        assert search.counts.complete == 3
        result = run_final(FinalOptions(study="debias", seeds=2, top_k=2, resamples=200, studies_dir=studies))
    finally:
        os.chdir(old)
    return root, studies / "debias" / "final", search, result


@pytest.mark.slow
def test_run_final_returns_the_report(report):
    _, final, search, result = report
    assert result.report_dir == final and not result.interrupted
    assert {name: path.name for name, path in result.files.items()} == {
        "runs": "runs.csv", "summary_csv": "summary.csv", "summary_md": "summary.md",
        "test_metrics": "test_metrics.png", "dynamics": "dynamics.png", **SEARCH_FIGURES, **WISEFT_FILES}
    summary = pd.read_csv(final / "summary.csv")
    assert len(result.summary) == len(summary)
    values = sorted(((row["value"], row["trial"]) for row in search.top), reverse=True)
    assert len(values) == 3 and values[1][0] > values[2][0]  # the best two are distinct from the worst
    chosen = [f"trial-{trial}" for _, trial in values[:2]]  # the two best trials by value
    assert set(result.verdicts) == set(chosen)
    assert set(pd.read_csv(final / "runs.csv")["label"]) == {*chosen, "baseline"}
    for label, verdict in result.verdicts.items():
        row = summary[(summary["label"] == label) & (summary["metric"] == "r1_mean")].iloc[0]
        expected = "better" if row["ci_low"] > 0 else "worse" if row["ci_high"] < 0 else "no clear difference"
        assert verdict == expected


@pytest.mark.slow
def test_every_file_is_written(report):
    _, final, _, _ = report
    for name in FILES:
        assert (final / name).is_file(), name
    runs = pd.read_csv(final / "runs.csv")
    assert len(runs) == 6 and sorted(runs["label"].unique()) == sorted(["baseline", *runs["label"].unique()[:2]])
    assert set(runs.groupby("label")["seed"].apply(tuple)) == {(0, 1)}
    assert (runs[runs["label"] == "baseline"]["loss"] == "infonce").all()
    assert (runs[runs["label"] != "baseline"]["loss"] == "sanw_debias").all()
    assert all(Path(d, "test_ranks.npz").is_file() for d in runs["run_dir"])
    text = (final / "summary.md").read_text()
    assert "InfoNCE with the other settings of trial-" in text and "no completed 'baseline' study found" in text
    assert "paired bootstrap" in text and "R@1 mean verdict" in text


@pytest.mark.slow
def test_summary_equals_recomputation_from_runs_csv(report):
    _, final, _, _ = report
    runs = pd.read_csv(final / "runs.csv")
    summary = pd.read_csv(final / "summary.csv")
    baseline = runs[runs["label"] == "baseline"]
    for _, row in summary.iterrows():
        values = runs.loc[runs["label"] == row["label"], f"test_{row['metric']}"]
        assert row["mean"] == pytest.approx(values.mean())
        assert row["std"] == pytest.approx(values.std(ddof=1))
        if row["label"] != "baseline":
            assert row["diff"] == pytest.approx(values.mean() - baseline[f"test_{row['metric']}"].mean())
            if not row["metric"].endswith("_mr"):
                assert row["ci_low"] <= row["ci_high"]
    # every test metric in runs.csv is what the saved per-query ranks give
    for _, run in runs.iterrows():
        recomputed = metrics_from_ranks(load_ranks(Path(run["run_dir"])))
        for key in METRIC_KEYS:
            assert run[f"test_{key}"] == pytest.approx(recomputed[key])


@pytest.mark.slow
def test_pngs_open_and_are_not_blank(report):
    _, final, _, _ = report
    for name in FILES:
        if name.endswith(".png"):
            with Image.open(final / name) as image:
                pixels = np.asarray(image.convert("L"), dtype=float)
            assert image.size[0] > 300 and pixels.std() > 5, name


@pytest.mark.slow
def test_rerun_reuses_finished_runs(report, capsys):
    root, final, _, _ = report
    registry = root / "studies" / "run_registry.csv"
    before = registry.read_text()
    assert final_main(["--study", "debias", "--seeds", "2", "--top-k", "2", "--resamples", "200",
                       "--studies-dir", str(root / "studies")]) == 0
    assert "6 of 6 runs already finished; training 0" in capsys.readouterr().err
    assert registry.read_text() == before  # nothing trained again


@pytest.mark.slow
def test_other_epochs_on_existing_runs_is_refused(report, capsys):
    root, _, _, _ = report
    assert final_main(["--study", "debias", "--seeds", "2", "--epochs", "3",
                       "--studies-dir", str(root / "studies")]) == 2
    assert "was trained with other settings (epochs: 2 -> 3)" in capsys.readouterr().err


@pytest.mark.slow
def test_unknown_study_lists_existing_ones(report, capsys):
    root, _, _, _ = report
    assert final_main(["--study", "nope", "--studies-dir", str(root / "studies")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study 'nope'" in err[0] and "(studies there: debias)" in err[0]


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    """A model that ranks every query first versus one that is random: the interval excludes 0;
    the same runs against themselves: it is [0, 0]."""
    import torch

    from clipse.evaluation.metrics import retrieval_ranks
    g = torch.Generator().manual_seed(0)
    owner = np.repeat(np.arange(40), 3)
    images = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    perfect = retrieval_ranks(images, images[owner], owner)
    noisy = [retrieval_ranks(images, torch.randn(120, 16, generator=g), owner) for _ in range(2)]
    interval = paired_bootstrap([perfect, perfect], noisy, resamples=300)
    assert interval["r1_mean"][0] > 0.5
    same = paired_bootstrap(noisy, noisy, resamples=100)
    assert same["r1_mean"] == (0.0, 0.0)


@pytest.mark.slow
def test_analysis_modules_run_on_their_own(report, tmp_path, capsys):
    root, final, _, _ = report
    table = pd.read_csv(final / "runs.csv")
    first = table["label"].iloc[0]
    runs = table.loc[table["label"].isin([first, "baseline"]), "run_dir"].tolist()  # one config + baseline
    out = tmp_path / "own"
    summary = subprocess.run([sys.executable, "-m", "analysis.summary", *runs, "--baseline", "infonce", "--out",
                              str(out), "--resamples", "100"], capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    table = pd.read_csv(out / "summary.csv")
    assert set(table["label"]) == {"sanw_debias", "infonce"}
    # the other entry points in this process (each subprocess costs seconds of imports)
    assert dynamics_main([*runs, "--out", str(out / "d.png")]) == 0 and (out / "d.png").is_file()
    assert plots_main(["debias", "--storage", str(root / "studies" / "debias" / "journal.log"), "--out",
                       str(out)]) == 0 and (out / "search_history.png").is_file()
    assert summary_main([str(tmp_path)]) == 2 and "not a finished run" in capsys.readouterr().err


class FakeTask:
    def __init__(self, label, state):
        self.label, self.state, self.error = label, state, "worker died"
        self.result = {"status": "completed"} if state == DONE else None


def test_a_lost_run_is_retried_within_max_retries(tmp_path, capsys):
    run = PlannedRun("trial-0", 0, TrainConfig(run_dir=str(tmp_path / "r")))
    workload = RunWorkload([run], ExecutorOptions(max_retries=1), "final x")
    (first,) = workload.wanted(room=4, outstanding=0)
    workload.finished(FakeTask(first.label, LOST))
    assert not workload.complete() and not workload.problems  # queued again
    (second,) = workload.wanted(room=4, outstanding=0)
    assert second.label == first.label and second.args == first.args
    workload.finished(FakeTask(second.label, LOST))
    assert workload.complete() and workload.problems == ["trial-0-seed0 (lost: worker died)"]
    assert "retrying from its checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_the_baseline_is_the_best_trial_of_the_baseline_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    studies = tmp_path / "studies"
    training = {"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12, "batch_size": 16,
                "epochs": 1, "data_root": str(tmp_path / "shapes")}
    for space in ("baseline", "debias"):
        run_search(SearchOptions(space=space, trials=3, pruner="none", seed=2, studies_dir=studies, training=training,
                                 min_weight_std=0.0))  # tiny runs barely reweight
    best, *others = sorted(load_study(tmp_path, "baseline").get_trials(), key=lambda t: t.value, reverse=True)
    assert best.value > others[-1].value and best.params["lr"] != others[-1].params["lr"]
    result = run_final(FinalOptions(study="debias", seeds=1, resamples=50, studies_dir=studies))
    assert f"baseline: best trial #{best.number} of study 'baseline'" in result.files["summary_md"].read_text()
    runs = pd.read_csv(result.files["runs"])
    baseline_run = runs[runs["label"] == "baseline"].iloc[0]
    settings = json.loads(baseline_run["params"])
    assert baseline_run["loss"] == "infonce" and settings["lr"] == best.params["lr"]
    assert settings["epochs"] == 1 and settings["shapes_train_images"] == 48  # this study's data and budget


@pytest.mark.slow
def test_wiseft_runs_from_each_start_to_each_test_checkpoint(report):
    _, final, _, _ = report
    runs = pd.read_csv(final / "runs.csv").set_index(["label", "seed"])
    wiseft = pd.read_csv(final / "wiseft.csv")
    assert sorted(set(wiseft["alpha"])) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ends = wiseft[wiseft["alpha"] == 1.0].set_index(["label", "seed"])
    starts = wiseft[wiseft["alpha"] == 0.0].set_index(["label", "seed"])
    assert set(ends.index) == set(runs.index)
    for key in ("r1_mean", "i2t_r1", "t2i_mr", "zs_top1"):
        assert (ends[key] == runs.loc[ends.index, f"test_{key}"]).all(), key
    assert (starts["zs_top1"] == runs.loc[starts.index, "start_zs_top1"]).all()
    summary = (final / "summary.md").read_text()
    assert "## WiSE-FT" in summary and "zs change" in summary
    assert any(line.startswith("- `trial-") and "frontier" in line for line in summary.splitlines())
