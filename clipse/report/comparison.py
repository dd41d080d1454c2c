"""The comparison table of a final report: per configuration and metric, mean ± std over seeds,
and against the baseline the difference of means with its paired-bootstrap interval and power
(the statistics are ``clipse.evaluation.statistics``; this module reads the runs' saved ranks)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from clipse.evaluation.metrics import METRIC_KEYS, MP_METRIC_KEYS, RetrievalRanks
from clipse.evaluation.statistics import (
    CONFIDENCE,
    image_variance,
    paired_bootstrap,
    power_figures,
    verdict,
)
from clipse.runs.folder import RunFolder
from clipse.util.errors import UserError


def load_ranks(run_dir: Path) -> RetrievalRanks:
    return RunFolder(run_dir).test_ranks()


def summarise(runs: pd.DataFrame, baseline_label: str | None, resamples: int = 2000,
              confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per (label, metric): mean, std (over seeds), n, and against the baseline the
    difference of means, its paired-bootstrap ``confidence`` interval and its power: ``se``, ``mde``,
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
            interval = paired_bootstrap(config_ranks, baseline_ranks, resamples, confidence=confidence)
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


def summary_verdicts(rows: list[dict], baseline_label: str) -> dict[str, str]:
    """Each configuration's R@1 mean against the baseline, from the rows of ``summarise``."""
    return {row["label"]: verdict(row, "r1_mean") for row in rows
            if row["metric"] == "r1_mean" and row["label"] != baseline_label}
