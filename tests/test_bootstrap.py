"""The paired bootstrap of the final report, checked as a statistical procedure: on simulated
paired data with a known difference its 95% interval covers that difference in about 95% of
repetitions, its width shrinks as 1/sqrt(n), and both test images and seeds are resampled."""

import numpy as np
import pytest
import torch

from clipse.metrics import RetrievalRanks, metrics_from_ranks, resampled_metrics, retrieval_ranks
from clipse.report.statistics import paired_bootstrap

# Simulated retrieval: image i is found with probability sigmoid(difficulty_i + effect + seed
# shift); difficulties spread with SPREAD, every training seed shifts all images by N(0, SEED_SD).
EFFECT, SEED_SD, SPREAD = 0.3, 0.3, 2.0


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def as_ranks(hits: np.ndarray) -> RetrievalRanks:
    """One caption per image; a hit ranks first, a miss 20th, in both directions."""
    rank = np.where(hits, 1, 20)
    return RetrievalRanks(t2i_rank=rank, i2t_best_rank=rank, i2t_ap10=hits.astype(float),
                          caption_image=np.arange(len(hits)))


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
