"""Comparing runs of a configuration with runs of a baseline on one test set: a 95% interval of
each metric's difference from a paired bootstrap, and the power of that comparison.

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
from statistics import NormalDist

import numpy as np

from clipse.evaluation.metrics import RetrievalRanks, resampled_metrics

CONFIDENCE = 0.95
POWER = 0.80
ALPHA = 0.05
EFFECT_OF_INTEREST = 0.01   # one point of a recall (metrics are fractions)


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
                     resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
                     ) -> dict[str, tuple[float, float]]:
    """The ``confidence`` interval (95%) of (config - baseline) for each metric but the median
    ranks: seeds and test images resampled together for both sides. Seeds pair by position (the
    same training seed)."""
    seeds, counts = _draws(len(config_ranks), config_ranks[0].n_images, resamples, seed)
    differences = _resampled_differences(config_ranks, baseline_ranks, seeds, counts)
    tail = (1 - confidence) / 2 * 100
    return {key: (float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail))) for key, d in differences.items()}


def family_confidence(comparisons: int, family: float = CONFIDENCE) -> float:
    """Bonferroni: each of ``comparisons`` intervals at ``1 - (1 - family) / comparisons``, so that
    the chance that any of them misses its true difference (the family-wise error) is at most
    ``1 - family``."""
    return 1 - (1 - family) / max(1, comparisons)


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
