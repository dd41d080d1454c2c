"""The leaderboard's table and figure (``clipse.leaderboard``): configurations ranked by test
R@1 mean, each against one baseline with a family-wise (Bonferroni) interval."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from clipse.evaluation.statistics import verdict  # noqa: E402
from clipse.report.summary import percent  # noqa: E402
from clipse.util.tables import markdown_table  # noqa: E402

SHOWN = ("r1_mean", "i2t_r1", "t2i_r1", "mp_t2i_r1", "mp_i2t_r1")


def leaderboard_table(summary: pd.DataFrame, runs: pd.DataFrame, baseline_label: str) -> pd.DataFrame:
    """One row per configuration, best test R@1 mean first: means and stds (fractions), the R@1
    mean difference to the baseline with its interval, verdict and MDE, the SANW weight spread
    and the tie share."""
    by = summary.set_index(["label", "metric"])
    rows = []
    for label in dict.fromkeys(summary["label"]):
        group = runs[runs["label"] == label]
        row = {"configuration": label, "loss": group["loss"].iloc[0], "seeds": len(group)}
        for metric in SHOWN:
            if (label, metric) in by.index:
                row[metric], row[f"{metric}_std"] = by.loc[(label, metric), "mean"], by.loc[(label, metric), "std"]
        r1 = by.loc[(label, "r1_mean")]
        if label != baseline_label:
            row.update(diff=r1["diff"], ci_low=r1["ci_low"], ci_high=r1["ci_high"], mde=r1.get("mde", np.nan),
                       verdict=verdict(r1, "r1_mean"))
        row["weight_std"] = group["train_weight_std"].mean() if "train_weight_std" in group else np.nan
        row["tie_share"] = group["test_tie_share"].mean() if "test_tie_share" in group else np.nan
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("r1_mean", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def leaderboard_markdown(table: pd.DataFrame, intro: str, comparisons: int, confidence: float) -> str:
    def pct(value) -> str:
        return "" if pd.isna(value) else f"{100 * value:.2f}"

    rows = []
    for _, row in table.iterrows():
        shown = {"rank": row["rank"], "configuration": row["configuration"], "loss": row["loss"]}
        for metric in SHOWN:
            if metric in row and not pd.isna(row[metric]):
                shown[metric] = f"{pct(row[metric])} ± {pct(row[f'{metric}_std'])}"
        has_diff = "diff" in row and not pd.isna(row.get("diff"))
        shown["R@1 mean − baseline"] = (f"{100 * row['diff']:+.2f} [{100 * row['ci_low']:+.2f}, {100 * row['ci_high']:+.2f}]"
                                        if has_diff else "")
        shown["verdict"] = row.get("verdict", "") if has_diff else "(baseline)"
        shown["MDE"] = pct(row.get("mde")) if has_diff else ""
        shown["SANW w std"] = "" if pd.isna(row["weight_std"]) else f"{row['weight_std']:.4f}"
        shown["tie share"] = pct(row["tie_share"])
        rows.append(shown)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    caption = (f"Test metrics in percent, mean ± std over seeds, ranked by R@1 mean. The difference to the baseline "
               f"has a {percent(confidence)} interval from a paired bootstrap over test images and seeds: Bonferroni "
               f"for {comparisons} comparisons (each at 1 − 0.05/{comparisons}), so that the family-wise error is at "
               "most 5%. MDE: the smallest R@1 mean difference each comparison detects with 80% power at two-sided "
               "alpha 0.05 (unadjusted).")
    return "\n".join([intro, "", caption, "", markdown_table(rows, columns)]) + "\n"


def plot_leaderboard(table: pd.DataFrame, out: Path, confidence: float) -> Path:
    """Each configuration's R@1 mean difference to the baseline with its family-wise interval."""
    rows = table.dropna(subset=["diff"]) if "diff" in table else table.iloc[0:0]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    y = np.arange(len(rows))[::-1]
    ax.errorbar(100 * rows["diff"], y, xerr=[100 * (rows["diff"] - rows["ci_low"]), 100 * (rows["ci_high"] - rows["diff"])],
                fmt="o", color="black", capsize=3)
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, rows["configuration"])
    ax.set_xlabel(f"test R@1 mean − baseline (points), {percent(confidence)} interval (Bonferroni)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
