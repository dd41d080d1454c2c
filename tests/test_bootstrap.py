"""The statistics of the final report. The paired bootstrap as a statistical procedure: on
simulated paired data with a known difference its 95% interval covers that difference in about
95% of repetitions, its width shrinks as 1/sqrt(n), both test images and seeds are resampled,
and it equals a plain-loop reference. Then the summary rows and verdicts built on it."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from clipse.evaluation.metrics import (
    METRIC_KEYS,
    RetrievalRanks,
    TiedRanks,
    metrics_from_ranks,
    resampled_metrics,
    retrieval_ranks,
)
from clipse.evaluation.statistics import (
    detection_multiplier,
    family_confidence,
    image_variance,
    paired_bootstrap,
    power_figures,
    verdict,
)
from clipse.report.comparison import summarise, summary_verdicts
from clipse.report.summary import (
    collapse_warnings,
    strict_rule_warning,
    summary_markdown,
    uniform_weight_warnings,
)
from clipse.runs.folder import RunFolder
from clipse.util.errors import UserError

# Simulated retrieval: image i is found with probability sigmoid(difficulty_i + effect + seed
# shift); difficulties spread with SPREAD, every training seed shifts all images by N(0, SEED_SD).
EFFECT, SEED_SD, SPREAD = 0.3, 0.3, 2.0


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def as_ranks(hits: np.ndarray) -> RetrievalRanks:
    """One caption per image; a hit ranks first, a miss 20th, in both directions."""
    rank = TiedRanks.untied(np.where(hits, 1, 20))
    no_ties = np.zeros(len(hits), bool)
    return RetrievalRanks(t2i=rank, i2t=rank, i2t_ap10=hits.astype(float), caption_image=np.arange(len(hits)),
                          t2i_content_tie=no_ties, i2t_content_tie=no_ties)


def simulate(n_images: int, n_seeds: int, rng) -> tuple[list[RetrievalRanks], list[RetrievalRanks]]:
    difficulty = rng.normal(0, SPREAD, n_images)  # the same test images for both sides: paired

    def side(effect):
        return [as_ranks(rng.random(n_images) < sigmoid(difficulty + effect + rng.normal(0, SEED_SD)))
                for _ in range(n_seeds)]

    return side(EFFECT), side(0.0)


@pytest.fixture(scope="module")
def true_difference():
    """The expected R@1 difference over the image population and training seeds."""
    rng = np.random.default_rng(123)
    difficulty = rng.normal(0, SPREAD, 4_000_000)
    return float(np.mean(sigmoid(difficulty + EFFECT + rng.normal(0, SEED_SD, difficulty.size))
                         - sigmoid(difficulty + rng.normal(0, SEED_SD, difficulty.size))))


def test_resampled_metrics_equal_metrics_from_ranks_per_resample():
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(30), rng.integers(1, 6, 30))
    images = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(30, 8)), dtype=torch.float32), dim=1)
    texts = images[owner] + torch.tensor(rng.normal(size=(len(owner), 8)), dtype=torch.float32)
    ranks = retrieval_ranks(images, texts, owner)
    counts = rng.multinomial(30, np.full(30, 1 / 30), size=7)
    many = resampled_metrics(ranks, counts)
    for r in range(7):
        one = metrics_from_ranks(ranks, counts[r])
        for key, values in many.items():
            assert values[r] == pytest.approx(one[key], abs=1e-12), key


def test_the_95_percent_interval_covers_the_true_difference_about_95_percent_of_the_time(true_difference):
    rng = np.random.default_rng(7)
    covered = 0
    for repetition in range(400):
        config, baseline = simulate(150, 3, rng)
        low, high = paired_bootstrap(config, baseline, resamples=400, seed=repetition)["r1_mean"]
        covered += low <= true_difference <= high
    assert 0.90 <= covered / 400 <= 0.99, covered / 400


def test_bonferroni_intervals_keep_the_family_wise_error_near_five_percent():
    """Four configurations without any effect against one baseline: with intervals adjusted for the
    four comparisons, a repetition in which any of them excludes zero is rare (about 5%); with
    plain 95% intervals it is several times as common."""
    rng = np.random.default_rng(17)
    m, repetitions = 4, 150
    adjusted = plain = 0
    for repetition in range(repetitions):
        difficulty = rng.normal(0, SPREAD, 120)

        def side():
            return [as_ranks(rng.random(120) < sigmoid(difficulty + rng.normal(0, SEED_SD))) for _ in range(3)]

        baseline = side()
        configs = [side() for _ in range(m)]
        misses = []
        for confidence in (family_confidence(m), 0.95):
            intervals = [paired_bootstrap(c, baseline, resamples=300, seed=repetition, confidence=confidence)["r1_mean"]
                         for c in configs]
            misses.append(any(low > 0 or high < 0 for low, high in intervals))
        adjusted += misses[0]
        plain += misses[1]
    assert family_confidence(m) == pytest.approx(1 - 0.05 / 4)
    assert adjusted / repetitions <= 0.09, adjusted / repetitions
    assert plain > 2 * max(adjusted, 1), (plain, adjusted)


def test_the_interval_narrows_as_one_over_sqrt_n():
    """With one seed per side only the test images vary: four times the images, half the width."""
    rng = np.random.default_rng(8)

    def mean_width(n):
        widths = []
        for repetition in range(40):
            low, high = paired_bootstrap(*simulate(n, 1, rng), resamples=300, seed=repetition)["r1_mean"]
            widths.append(high - low)
        return np.mean(widths)

    assert 1.6 <= mean_width(100) / mean_width(400) <= 2.5  # sqrt(400 / 100) = 2


def test_test_images_are_resampled():
    """One seed per side: only the resampling of images can give the interval a width."""
    rng = np.random.default_rng(9)
    low, high = paired_bootstrap(*simulate(200, 1, rng), resamples=500)["r1_mean"]
    assert high - low > 0.05


def test_seeds_are_resampled():
    """Every image alike within a run: only the resampling of seeds can give a width."""
    n = 50
    config = [as_ranks(np.ones(n, bool)), as_ranks(np.zeros(n, bool)), as_ranks(np.ones(n, bool))]
    baseline = [as_ranks(np.zeros(n, bool))] * 3
    low, high = paired_bootstrap(config, baseline, resamples=500)["r1_mean"]
    assert low < 0.5 < high and high - low > 0.3


def reference_bootstrap(config, baseline, resamples, seed):
    """The interval by the letter: per resample draw seeds then images, recompute every metric of
    every drawn seed, difference of the means; then the 2.5th and 97.5th percentiles."""
    rng = np.random.default_rng(seed)
    n = config[0].n_images
    differences = {}
    for _ in range(resamples):
        seeds = rng.integers(0, len(config), len(config))
        counts = rng.multinomial(n, np.full(n, 1.0 / n))
        for key in ("r1_mean", "i2t_r5", "t2i_map10", "rsum"):
            c = np.mean([metrics_from_ranks(config[s], counts)[key] for s in seeds])
            b = np.mean([metrics_from_ranks(baseline[s], counts)[key] for s in seeds])
            differences.setdefault(key, []).append(c - b)
    return {key: (np.percentile(v, 2.5), np.percentile(v, 97.5)) for key, v in differences.items()}


def test_the_interval_is_the_central_95_percent_of_the_resampled_differences():
    config, baseline = simulate(40, 3, np.random.default_rng(11))
    got = paired_bootstrap(config, baseline, resamples=300, seed=4)
    for key, (low, high) in reference_bootstrap(config, baseline, 300, 4).items():
        assert got[key] == pytest.approx((low, high), abs=1e-12), key
    assert set(got) == {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_map10", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_map10",
                        "r1_mean", "rsum"}  # no interval for the median ranks
    assert paired_bootstrap(config, baseline) == paired_bootstrap(config, baseline, resamples=2000, seed=0)


def test_runs_on_different_test_sets_are_not_compared():
    config, baseline = simulate(40, 2, np.random.default_rng(12))
    shorter = [as_ranks(np.ones(39, bool))] * 2
    other_owner = [dataclasses.replace(r, caption_image=r.caption_image[::-1].copy()) for r in baseline]
    for other in (shorter, other_owner):
        with pytest.raises(ValueError, match="^runs were tested on different test sets; a paired comparison "
                                             "needs the same one$"):
            paired_bootstrap(config, other, resamples=10)


def write_runs(tmp_path, sides: dict[str, list[RetrievalRanks]]) -> pd.DataFrame:
    """Run folders holding only test ranks, and the runs table the report reads."""
    rows = []
    for label, ranks in sides.items():
        for seed, r in enumerate(ranks):
            folder = RunFolder(tmp_path / f"{label}-{seed}")
            folder.path.mkdir(parents=True)
            folder.save_test_ranks(r)
            rows.append({"label": label, "seed": seed, "run_dir": str(folder.path),
                         **{f"test_{k}": v for k, v in metrics_from_ranks(r).items()}})
    return pd.DataFrame(rows)


def test_summary_rows_and_verdicts(tmp_path):
    rng = np.random.default_rng(13)
    n = 120
    hard = [as_ranks(rng.random(n) < 0.3) for _ in range(3)]
    easy = [as_ranks(rng.random(n) < 0.9) for _ in range(3)]
    same = [as_ranks(h.t2i.hit_rate(1) == 1) for h in hard]
    runs = write_runs(tmp_path, {"better": easy, "baseline": hard, "same": same})
    summary = summarise(runs, "baseline", resamples=300)
    assert len(summary) == 3 * len(METRIC_KEYS)
    assert list(dict.fromkeys(summary["label"])) == ["better", "baseline", "same"]  # as the runs come
    interval = paired_bootstrap(easy, hard, resamples=300)
    better = summary[summary["label"] == "better"].set_index("metric")
    assert (better.loc["r1_mean", "ci_low"], better.loc["r1_mean", "ci_high"]) == interval["r1_mean"]
    for _, row in summary.iterrows():
        values = runs.loc[runs["label"] == row["label"], f"test_{row['metric']}"]
        assert row["mean"] == pytest.approx(values.mean()) and row["std"] == pytest.approx(values.std(ddof=1))
        assert row["n"] == 3
        if row["label"] == "baseline":
            assert np.isnan(row["diff"])
            continue
        base = runs.loc[runs["label"] == "baseline", f"test_{row['metric']}"]
        assert row["diff"] == pytest.approx(values.mean() - base.mean())
        if row["metric"].endswith("_mr"):
            assert np.isnan(row["ci_low"]) and np.isnan(row["ci_high"])
        else:
            assert row["ci_low"] <= row["diff"] <= row["ci_high"]
    verdicts = summary_verdicts(summary.to_dict(orient="records"), "baseline")
    assert verdicts == {"better": "better", "same": "no clear difference"}
    worse = summarise(write_runs(tmp_path / "w", {"worse": hard, "baseline": easy}), "baseline", resamples=300)
    by_metric = worse[worse["label"] == "worse"].set_index("metric")
    assert verdict(by_metric.loc["r1_mean"], "r1_mean") == "worse"
    assert verdict(by_metric.loc["i2t_mr"], "i2t_mr") == ""  # no interval, no verdict
    assert verdict({"ci_low": 0.5, "ci_high": 2.0}, "t2i_mr") == "worse"  # a higher median rank is worse
    assert verdict({"ci_low": -2.0, "ci_high": -0.5}, "t2i_mr") == "better"


def test_a_baseline_trained_with_other_seeds_is_refused(tmp_path):
    rng = np.random.default_rng(14)
    runs = write_runs(tmp_path, {"config": [as_ranks(rng.random(20) < 0.5)] * 2,
                                 "baseline": [as_ranks(rng.random(20) < 0.5)] * 2})
    runs.loc[runs["label"] == "baseline", "seed"] = [5, 6]
    with pytest.raises(UserError, match="'config' and the baseline were trained with different seeds"):
        summarise(runs, "baseline", resamples=10)
    plain = summarise(runs, None)
    assert "diff" not in plain and set(plain["label"]) == {"config", "baseline"}


@pytest.mark.parametrize("seeds", [1, 2])
def test_the_spread_of_one_seed_is_zero_and_of_two_their_sample_std(tmp_path, seeds):
    ranks = [as_ranks(np.arange(20) < 5 + 5 * s) for s in range(seeds)]
    row = summarise(write_runs(tmp_path, {"only": ranks}), None).set_index("metric").loc["r1_mean"]
    assert row["n"] == seeds and row["std"] == pytest.approx(0.0 if seeds == 1 else np.std([0.25, 0.5], ddof=1))


def test_the_verdict_of_a_configuration_is_that_of_its_r1_mean():
    rows = [{"label": "c", "metric": "r1_mean", "ci_low": 0.1, "ci_high": 0.2},
            {"label": "c", "metric": "rsum", "ci_low": -0.3, "ci_high": -0.1},
            {"label": "b", "metric": "r1_mean", "ci_low": float("nan"), "ci_high": float("nan")}]
    assert summary_verdicts(rows, "b") == {"c": "better"}


def test_a_baseline_label_that_no_run_has_and_zero_resamples_are_refused(tmp_path):
    runs = write_runs(tmp_path, {"infonce": [as_ranks(np.ones(10, bool))], "sanw": [as_ranks(np.ones(10, bool))]})
    with pytest.raises(UserError, match=r"no runs labelled 'infonse' to compare with \(labels: infonce, sanw\)"):
        summarise(runs, "infonse")
    with pytest.raises(UserError, match="resamples must be at least 1, got 0"):
        summarise(runs, "infonce", resamples=0)
    assert len(summarise(runs, "infonce", resamples=1)) == 2 * len(METRIC_KEYS)  # one resample is allowed


# ----------------------------------------------------------------------------------------------
# power


def closed_form_power(effect: float, se: float) -> float:
    """Power of the two-sided z-test at alpha 0.05 to detect ``effect`` with standard error ``se``."""
    z = 1.959963984540054
    return float(norm_cdf(effect / se - z) + norm_cdf(-effect / se - z))


def norm_cdf(x):
    from math import erf, sqrt
    return 0.5 * (1 + erf(x / sqrt(2)))


def test_the_detection_multiplier_is_z_975_plus_z_80():
    assert detection_multiplier() == pytest.approx(1.959963984540054 + 0.8416212335729143, abs=1e-9)


def test_the_minimum_detectable_difference_is_detected_80_percent_of_the_time_on_normal_data():
    """Synthetic normal data with known variances: per-seed differences N(delta, seed_var) plus a
    test-set error N(0, image_var) shared by all seeds. At delta = MDE the z-test rejects about 80%."""
    seed_var, image_var, seeds = 0.02 ** 2, 0.004 ** 2, 3
    figures = power_figures(seed_var, image_var, seeds, images=500)
    assert figures.se == pytest.approx(np.sqrt(seed_var / seeds + image_var))
    rng = np.random.default_rng(21)
    trials = 40_000
    means = (rng.normal(figures.mde, np.sqrt(seed_var), (trials, seeds)).mean(axis=1)
             + rng.normal(0, np.sqrt(image_var), trials))
    rejected = np.mean(np.abs(means / figures.se) > 1.959963984540054)
    assert rejected == pytest.approx(0.80, abs=0.01)
    assert closed_form_power(figures.mde, figures.se) == pytest.approx(0.80, abs=1e-3)


def test_seeds_and_images_needed_are_the_smallest_that_reach_80_percent_power():
    seed_var, image_var, seeds, images = 0.03 ** 2, 0.002 ** 2, 3, 400
    figures = power_figures(seed_var, image_var, seeds, images)
    assert not figures.powered and figures.mde > 0.01
    n = figures.seeds_needed
    assert closed_form_power(0.01, np.sqrt(seed_var / n + image_var)) >= 0.80
    assert closed_form_power(0.01, np.sqrt(seed_var / (n - 1) + image_var)) < 0.80
    # more images, these seeds: the image variance scales as 1 / images
    roomy = power_figures(0.004 ** 2, 0.004 ** 2, 4, images)
    m = roomy.images_needed
    assert closed_form_power(0.01, np.sqrt(0.004 ** 2 / 4 + 0.004 ** 2 * images / m)) >= 0.80
    assert closed_form_power(0.01, np.sqrt(0.004 ** 2 / 4 + 0.004 ** 2 * images / (m - 1))) < 0.80
    assert roomy.seeds_needed is None  # this test set alone is too noisy for one point, whatever the seeds


def test_a_one_point_effect_out_of_reach_of_seeds_or_images_alone_says_so():
    noisy_test_set = power_figures(seed_var=1e-6, image_var=0.01 ** 2, seeds=3, images=100)
    assert noisy_test_set.seeds_needed is None and noisy_test_set.images_needed is not None
    noisy_seeds = power_figures(seed_var=0.05 ** 2, image_var=1e-8, seeds=2, images=100)
    assert noisy_seeds.images_needed is None and noisy_seeds.seeds_needed > 2
    quiet = power_figures(1e-8, 1e-8, 3, 100)
    assert quiet.powered and quiet.seeds_needed == 1 and quiet.images_needed == 1  # never fewer than one


def test_the_image_variance_is_that_of_a_mean_over_resampled_images():
    """One seed per side: resampling images gives var(hit difference) / images."""
    rng = np.random.default_rng(22)
    config, baseline = simulate(400, 1, rng)
    hits = (config[0].t2i.hit_rate(1) == 1).astype(float) - (baseline[0].t2i.hit_rate(1) == 1).astype(float)
    got = image_variance(config, baseline, resamples=3000)["t2i_r1"]
    assert got == pytest.approx(np.var(hits) / 400, rel=0.1)


def power_needed_seen(summary, runs, config, baseline) -> set:
    """Checks the seeds and images needed for one point of every metric of the one configuration
    against ``power_figures`` (inf: out of reach alone); returns the numbers needed (None: inf)."""
    label = next(label for label in summary["label"].unique() if label != "baseline")
    images_var, seen = image_variance(config, baseline, resamples=300), set()
    for metric, row in summary[summary["label"] == label].set_index("metric").iterrows():
        if metric.endswith("_mr"):  # no interval, no power
            assert np.isnan(row["seeds_for_1pt"]) and np.isnan(row["images_for_1pt"])
            continue
        differences = (runs.loc[runs["label"] == label, f"test_{metric}"].to_numpy()
                       - runs.loc[runs["label"] == "baseline", f"test_{metric}"].to_numpy())
        figures = power_figures(np.var(differences, ddof=1), images_var[metric], len(differences),
                                config[0].n_images)
        for column, needed in (("seeds_for_1pt", figures.seeds_needed), ("images_for_1pt", figures.images_needed)):
            assert row[column] == (np.inf if needed is None else needed)
            seen.add(needed)
    return seen


def test_the_report_gives_power_and_says_when_a_null_result_was_underpowered(tmp_path):
    rng = np.random.default_rng(23)
    base = [as_ranks(rng.random(60) < 0.5) for _ in range(3)]
    same = [as_ranks(rng.random(60) < 0.5) for _ in range(3)]
    runs = write_runs(tmp_path, {"same": same, "baseline": base})
    summary = summarise(runs, "baseline", resamples=300)
    row = summary[summary["label"] == "same"].set_index("metric").loc["r1_mean"]
    differences = (runs.loc[runs["label"] == "same", "test_r1_mean"].to_numpy()
                   - runs.loc[runs["label"] == "baseline", "test_r1_mean"].to_numpy())
    images_var = image_variance(same, base, resamples=300)["r1_mean"]
    expected = power_figures(np.var(differences, ddof=1), images_var, 3, 60)
    assert row["mde"] == pytest.approx(expected.mde) and row["se"] == pytest.approx(expected.se)
    assert power_needed_seen(summary, runs, same, base) == {None}  # 60 images: one point is out of reach
    # 4,000 images and near-identical seeds: both are within reach
    many = [as_ranks(rng.random(4000) < 0.5) for _ in range(3)]
    near = [as_ranks(np.where(np.arange(4000) < 5 + s, ~(r.t2i.hit_rate(1) == 1), r.t2i.hit_rate(1) == 1)) for s, r in enumerate(many)]
    close_runs = write_runs(tmp_path / "close", {"near": near, "baseline": many})
    seen = power_needed_seen(summarise(close_runs, "baseline", resamples=300), close_runs, near, many)
    assert None not in seen
    assert row["mde"] > 0.01  # 60 test images cannot see one point
    text = summary_markdown(summary, runs.assign(train_weight_std=0.0), "baseline", "intro")
    assert "MDE r1_mean" in text
    assert "`same`: the R@1 mean interval contains zero, and this comparison was not powered" in text
    one_seed = summarise(write_runs(tmp_path / "one", {"same": same[:1], "baseline": base[:1]}), "baseline",
                         resamples=50)
    assert np.isnan(one_seed.set_index(["label", "metric"]).loc[("same", "r1_mean"), "mde"])


def test_the_report_flags_sanw_whose_weights_stay_within_one_percent_of_one():
    runs = pd.DataFrame([
        {"label": "flat", "loss": "sanw_bandpass", "train_weight_min": 0.995, "train_weight_max": 1.004},
        {"label": "flat", "loss": "sanw_bandpass", "train_weight_min": 0.992, "train_weight_max": 1.006},
        {"label": "real", "loss": "sanw_debias", "train_weight_min": 0.30, "train_weight_max": 1.2},
        {"label": "edge", "loss": "sanw_debias", "train_weight_min": 0.995, "train_weight_max": 1.02},
        {"label": "baseline", "loss": "infonce", "train_weight_min": 1.0, "train_weight_max": 1.0}])
    warnings = uniform_weight_warnings(runs)
    assert list(warnings) == ["flat"] and "smallest 0.9935, largest 1.0050" in warnings["flat"]
    assert uniform_weight_warnings(runs.drop(columns=["train_weight_min"])) == {}


def test_the_report_warns_of_collapse_and_of_runs_scored_under_the_strict_rule(tmp_path):
    rng = np.random.default_rng(31)
    collapsed_images = torch.ones(50, 4)
    texts = torch.tensor(rng.normal(size=(50, 4)), dtype=torch.float32)
    trained = [retrieval_ranks(texts + 0.1 * torch.tensor(rng.normal(size=(50, 4)), dtype=torch.float32), texts,
                               np.arange(50)) for _ in range(2)]
    collapsed = [retrieval_ranks(collapsed_images, texts, np.arange(50))] * 2
    runs = write_runs(tmp_path, {"collapsed": collapsed, "baseline": trained})
    text = summary_markdown(summarise(runs, "baseline", resamples=50), runs.assign(rank_rule="tie-aware"),
                            "baseline", "intro")
    assert "**Warning:** `collapsed` has 100.0% of its test queries tied" in text and "`baseline` has" not in text
    assert collapse_warnings(runs.assign(test_tie_share=0.01)) == {}  # 1% is the limit, not above it
    # a run folder of clipse 0.1 (integer ranks, no rule): loaded as the strict rule, and named
    old = RunFolder(tmp_path / "old")
    old.path.mkdir()
    np.savez(old.test_ranks_file, t2i_rank=np.arange(1, 51),
             i2t_best_rank=np.ones(50, int), i2t_ap10=np.ones(50), caption_image=np.arange(50))
    assert old.test_ranks().rule == "strict" and metrics_from_ranks(old.test_ranks())["i2t_r1"] == 1.0
    mixed = runs.assign(rank_rule=["tie-aware"] * 3 + ["strict"])
    warning = strict_rule_warning(mixed)
    assert len(warning) == 1 and "1 of 4 runs were scored under the strict-rank rule" in warning[0]
    assert strict_rule_warning(runs.assign(rank_rule="tie-aware")) == []
