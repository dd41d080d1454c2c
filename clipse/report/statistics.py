"""The numbers of a final report: mean ± std per configuration and metric, the difference to a
baseline with a 95% interval from a paired bootstrap, and the power of that comparison.

The bootstrap resamples test images (each with its captions) and seeds, the same draw for a
configuration and the baseline (paired), and recomputes every metric from the per-query ranks
each run saved (``test_ranks.npz``). The median ranks get no interval (resampling a median of
ranks is too coarse to mean much); the difference of their means is still reported.

Power (``power_figures``): the variance of the mean paired difference is modelled as
``seed_var / seeds + image_var_1 / images``: ``seed_var`` is the variance of the per-seed
differences (training noise; every seed is tested on the same images), and ``image_var_1 /
images`` is the variance of the mean difference when only the test images are resampled (the
test set's sampling noise, which more seeds do not average away). The minimum detectable
difference at 80% power and two-sided alpha 0.05 is ``(z_0.975 + z_0.80) * SE`` (normal
approximation: with 2 or 3 seeds ``seed_var`` is itself a rough estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from clipse.errors import UserError
from clipse.metrics import METRIC_KEYS, MP_METRIC_KEYS, RetrievalRanks, resampled_metrics
from clipse.run_folder import RunFolder

CONFIDENCE = 0.95
POWER = 0.80
ALPHA = 0.05
EFFECT_OF_INTEREST = 0.01   # one point of a recall (metrics are fractions)


def load_ranks(run_dir: Path) -> RetrievalRanks:
    return RunFolder(run_dir).test_ranks()


def _draws(n_seeds: int, n_images: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per resample, the drawn seeds (positions) and the drawn count of every test image."""
    rng = np.random.default_rng(seed)
    seeds = np.empty((resamples, n_seeds), dtype=int)
    counts = np.empty((resamples, n_images))
    for r in range(resamples):  # one draw of seeds, then of images, per resample
        seeds[r] = rng.integers(0, n_seeds, n_seeds)
        counts[r] = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images))
    return seeds, counts


def _resampled_differences(config_ranks: list[RetrievalRanks], baseline_ranks: list[RetrievalRanks],
                           seeds: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per metric, (config - baseline) of the means over the drawn seeds, one value per resample."""
    n_images = config_ranks[0].n_images
    for ranks in config_ranks + baseline_ranks:
        if ranks.n_images != n_images or not np.array_equal(ranks.caption_image, config_ranks[0].caption_image):
            raise ValueError("runs were tested on different test sets; a paired comparison needs the same one")
    rows = np.arange(len(seeds))[:, None]

    def side(ranks: list[RetrievalRanks]) -> dict[str, np.ndarray]:
        per_seed = [resampled_metrics(r, counts) for r in ranks]  # seed -> key -> (R,)
        shared = [key for key in per_seed[0] if all(key in m for m in per_seed)]
        return {key: np.stack([m[key] for m in per_seed])[seeds, rows].mean(axis=1) for key in shared}

    config, baseline = side(config_ranks), side(baseline_ranks)
    return {key: config[key] - baseline[key] for key in config if key in baseline}


def paired_bootstrap(config_ranks: list[RetrievalRanks], baseline_ranks: list[RetrievalRanks],
                     resamples: int = 2000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% interval of (config - baseline) for each metric but the median ranks: seeds and
    test images resampled together for both sides. Seeds pair by position (the same training
    seed)."""
    seeds, counts = _draws(len(config_ranks), config_ranks[0].n_images, resamples, seed)
    differences = _resampled_differences(config_ranks, baseline_ranks, seeds, counts)
    tail = (1 - CONFIDENCE) / 2 * 100
    return {key: (float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail))) for key, d in differences.items()}


def image_variance(config_ranks: list[RetrievalRanks], baseline_ranks: list[RetrievalRanks],
                   resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Variance of the mean paired difference when only the test images are resampled (every
    seed kept): the test set's share of the uncertainty."""
    n_seeds = len(config_ranks)
    _, counts = _draws(n_seeds, config_ranks[0].n_images, resamples, seed)
    every_seed = np.tile(np.arange(n_seeds), (resamples, 1))
    differences = _resampled_differences(config_ranks, baseline_ranks, every_seed, counts)
    return {key: float(np.var(d, ddof=1)) for key, d in differences.items()}


@dataclass(frozen=True)
class PowerFigures:
    """How small a difference a comparison could see, and what it would take to see one point."""

    se: float                      # standard error of the mean paired difference
    mde: float                     # minimum detectable difference (80% power, two-sided alpha 0.05)
    seeds_needed: int | None       # seeds (this test set) to detect EFFECT_OF_INTEREST; None: unreachable
    images_needed: int | None      # test images (these seeds) to detect it; None: unreachable

    @property
    def powered(self) -> bool:
        return self.mde <= EFFECT_OF_INTEREST


def detection_multiplier(alpha: float = ALPHA, power: float = POWER) -> float:
    """z_(1-alpha/2) + z_power: the MDE in standard errors (2.80 for the defaults)."""
    normal = NormalDist()
    return normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)


def power_figures(seed_var: float, image_var: float, seeds: int, images: int,
                  effect: float = EFFECT_OF_INTEREST) -> PowerFigures:
    """The module docstring's model: ``seed_var`` is the variance of the per-seed differences,
    ``image_var`` the images-only bootstrap variance of their mean with ``images`` test images."""
    k = detection_multiplier()
    se = math.sqrt(seed_var / seeds + image_var)
    allowed = (effect / k) ** 2       # the largest variance of the mean that still detects ``effect``
    seed_room, image_room = allowed - image_var, allowed - seed_var / seeds
    seeds_needed = max(1, math.ceil(seed_var / seed_room)) if seed_room > 0 else None
    images_needed = max(1, math.ceil(image_var * images / image_room)) if image_room > 0 else None
    return PowerFigures(se=se, mde=k * se, seeds_needed=seeds_needed, images_needed=images_needed)


def summarise(runs: pd.DataFrame, baseline_label: str | None, resamples: int = 2000) -> pd.DataFrame:
    """One row per (label, metric): mean, std (over seeds), n, and against the baseline the
    difference of means, its paired-bootstrap interval and its power: ``se``, ``mde``,
    ``seeds_for_1pt`` and ``images_for_1pt`` (inf: not reachable by that alone; NaN with one
    seed, where the seed variance is unknown; none for the median ranks)."""
    if resamples < 1:
        raise UserError(f"resamples must be at least 1, got {resamples}")
    labels = list(dict.fromkeys(runs["label"]))
    if baseline_label is not None and baseline_label not in labels:
        raise UserError(f"no runs labelled '{baseline_label}' to compare with (labels: {', '.join(map(str, labels))})")
    rows = []
    baseline = runs[runs["label"] == baseline_label].sort_values("seed") if baseline_label else None
    for label, group in runs.groupby("label", sort=False):
        group = group.sort_values("seed")
        interval, images_var, n_images = {}, {}, 0
        if baseline is not None and label != baseline_label:
            if list(group["seed"]) != list(baseline["seed"]):
                raise UserError(f"'{label}' and the baseline were trained with different seeds")
            config_ranks = [load_ranks(d) for d in group["run_dir"]]
            baseline_ranks = [load_ranks(d) for d in baseline["run_dir"]]
            interval = paired_bootstrap(config_ranks, baseline_ranks, resamples)
            images_var = image_variance(config_ranks, baseline_ranks, resamples)
            n_images = config_ranks[0].n_images
        for key in METRIC_KEYS + shared_multi_positive_keys(runs):
            values = group[f"test_{key}"].astype(float)
            row = {"label": label, "metric": key, "mean": values.mean(),
                   "std": values.std(ddof=1) if len(values) > 1 else 0.0, "n": len(values)}
            if baseline is not None and label != baseline_label:
                differences = values.to_numpy() - baseline[f"test_{key}"].astype(float).to_numpy()
                row["diff"] = differences.mean()
                row["ci_low"], row["ci_high"] = interval.get(key, (np.nan, np.nan))
                row.update(_power_columns(differences, images_var.get(key), n_images))
            rows.append(row)
    return pd.DataFrame(rows)


def shared_multi_positive_keys(runs: pd.DataFrame) -> tuple[str, ...]:
    """The multi-positive metrics every run has (runs from before they existed have none)."""
    return tuple(key for key in MP_METRIC_KEYS if f"test_{key}" in runs and runs[f"test_{key}"].notna().all())


def _power_columns(differences: np.ndarray, images_var: float | None, n_images: int) -> dict[str, float]:
    seed_var = float(np.var(differences, ddof=1)) if len(differences) > 1 else math.nan
    if images_var is None or not (math.isfinite(seed_var) and math.isfinite(images_var)):  # one seed, one resample
        return {"se": np.nan, "mde": np.nan, "seeds_for_1pt": np.nan, "images_for_1pt": np.nan}
    figures = power_figures(seed_var, images_var, len(differences), n_images)
    return {"se": figures.se, "mde": figures.mde,
            "seeds_for_1pt": figures.seeds_needed if figures.seeds_needed is not None else math.inf,
            "images_for_1pt": figures.images_needed if figures.images_needed is not None else math.inf}


def verdict(row, metric: str) -> str:
    """What the interval says: better / worse than the baseline, or no clear difference."""
    if not np.isfinite(row.get("ci_low", np.nan)):
        return ""
    lower_is_better = metric.endswith("_mr")
    if row["ci_low"] > 0:
        return "worse" if lower_is_better else "better"
    if row["ci_high"] < 0:
        return "better" if lower_is_better else "worse"
    return "no clear difference"


def summary_verdicts(rows: list[dict], baseline_label: str) -> dict[str, str]:
    """Each configuration's R@1 mean against the baseline, from the rows of ``summarise``."""
    return {row["label"]: verdict(row, "r1_mean") for row in rows
            if row["metric"] == "r1_mean" and row["label"] != baseline_label}
