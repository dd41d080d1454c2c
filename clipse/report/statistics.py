"""The numbers of a final report: mean ± std per configuration and metric, and the difference
to a baseline with a 95% interval from a paired bootstrap.

The bootstrap resamples test images (each with its captions) and seeds, the same draw for a
configuration and the baseline (paired), and recomputes every metric from the per-query ranks
each run saved (``test_ranks.npz``). The median ranks get no interval (resampling a median of
ranks is too coarse to mean much); the difference of their means is still reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clipse.errors import UserError
from clipse.metrics import METRIC_KEYS, RetrievalRanks, resampled_metrics
from clipse.run_folder import RunFolder

CONFIDENCE = 0.95


def load_ranks(run_dir: Path) -> RetrievalRanks:
    return RunFolder(run_dir).test_ranks()


def paired_bootstrap(config_ranks: list[RetrievalRanks], baseline_ranks: list[RetrievalRanks],
                     resamples: int = 2000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% interval of (config - baseline) for each metric but the median ranks: seeds and
    test images resampled together for both sides. Seeds pair by position (the same training
    seed)."""
    n_images = len(config_ranks[0].i2t_best_rank)
    for ranks in config_ranks + baseline_ranks:
        if len(ranks.i2t_best_rank) != n_images or not np.array_equal(ranks.caption_image, config_ranks[0].caption_image):
            raise ValueError("runs were tested on different test sets; a paired comparison needs the same one")
    rng = np.random.default_rng(seed)
    n_seeds = len(config_ranks)
    seeds = np.empty((resamples, n_seeds), dtype=int)
    counts = np.empty((resamples, n_images))
    for r in range(resamples):  # one draw of seeds, then of images, per resample
        seeds[r] = rng.integers(0, n_seeds, n_seeds)
        counts[r] = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images))

    def side(ranks: list[RetrievalRanks]) -> dict[str, np.ndarray]:
        """Each metric's mean over the drawn seeds, per resample."""
        per_seed = [resampled_metrics(r, counts) for r in ranks]  # seed -> key -> (R,)
        return {key: np.stack([m[key] for m in per_seed])[seeds, np.arange(resamples)[:, None]].mean(axis=1)
                for key in per_seed[0]}

    config, baseline = side(config_ranks), side(baseline_ranks)
    tail = (1 - CONFIDENCE) / 2 * 100
    return {key: (float(np.percentile(config[key] - baseline[key], tail)),
                  float(np.percentile(config[key] - baseline[key], 100 - tail))) for key in config}


def summarise(runs: pd.DataFrame, baseline_label: str | None, resamples: int = 2000) -> pd.DataFrame:
    """One row per (label, metric): mean, std (over seeds), n, and against the baseline the
    difference of means and its paired-bootstrap interval."""
    if resamples < 1:
        raise UserError(f"resamples must be at least 1, got {resamples}")
    labels = list(dict.fromkeys(runs["label"]))
    if baseline_label is not None and baseline_label not in labels:
        raise UserError(f"no runs labelled '{baseline_label}' to compare with (labels: {', '.join(map(str, labels))})")
    rows = []
    baseline = runs[runs["label"] == baseline_label].sort_values("seed") if baseline_label else None
    for label, group in runs.groupby("label", sort=False):
        group = group.sort_values("seed")
        interval = {}
        if baseline is not None and label != baseline_label:
            if list(group["seed"]) != list(baseline["seed"]):
                raise UserError(f"'{label}' and the baseline were trained with different seeds")
            interval = paired_bootstrap([load_ranks(d) for d in group["run_dir"]],
                                        [load_ranks(d) for d in baseline["run_dir"]], resamples)
        for key in METRIC_KEYS:
            values = group[f"test_{key}"].astype(float)
            row = {"label": label, "metric": key, "mean": values.mean(),
                   "std": values.std(ddof=1) if len(values) > 1 else 0.0, "n": len(values)}
            if baseline is not None and label != baseline_label:
                row["diff"] = values.mean() - baseline[f"test_{key}"].astype(float).mean()
                row["ci_low"], row["ci_high"] = interval.get(key, (np.nan, np.nan))
            rows.append(row)
    return pd.DataFrame(rows)


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
