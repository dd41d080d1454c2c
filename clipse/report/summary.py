"""Test-split results of a set of runs: a per-run table, mean ± std per configuration, and the
difference to a baseline with a 95% confidence interval from a paired bootstrap (the numbers
come from ``clipse.report.comparison``; this module reads runs and writes tables and plots).

    python -m analysis.summary RUN_DIR [RUN_DIR ...] [--label-by loss] [--baseline infonce] [--out DIR]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from clipse.config import TEST_SET_KEYS  # noqa: E402
from clipse.evaluation.metrics import RANK_RULE  # noqa: E402
from clipse.evaluation.statistics import (  # noqa: E402
    ALPHA,
    CONFIDENCE,
    EFFECT_OF_INTEREST,
    POWER,
    verdict,
)
from clipse.report.comparison import summarise  # noqa: E402
from clipse.runs.folder import RunFolder  # noqa: E402
from clipse.util.errors import UserError  # noqa: E402
from clipse.util.tables import markdown_table  # noqa: E402

HEADLINE = ["r1_mean", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "rsum", "i2t_map10", "t2i_map10", "i2t_mr", "t2i_mr"]
MULTI_POSITIVE_HEADLINE = ["mp_i2t_r1", "mp_t2i_r1", "mp_i2t_r5", "mp_t2i_r5"]  # data with ground truth only


def headline(summary: pd.DataFrame) -> list[str]:
    return HEADLINE + [key for key in MULTI_POSITIVE_HEADLINE if key in set(summary["metric"])]


@dataclass
class RunRecord:
    run_dir: Path
    label: str
    seed: int


def read_runs(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run: label, seed, settings, best validation and test metrics, SANW stats."""
    rows, data_settings = [], None
    for record in records:
        folder = RunFolder(record.run_dir)
        result, saved = folder.result(), folder.saved_config()
        if result is None or saved is None or not result.test_metrics or not folder.test_ranks_file.exists():
            raise UserError(f"{record.run_dir}: not a finished run with test results (train with --eval-test)")
        config = saved.to_mapping()
        settings = {k: config.get(k) for k in TEST_SET_KEYS}
        if data_settings is not None and settings != data_settings:
            changed = [k for k in TEST_SET_KEYS if settings[k] != data_settings[k]]
            raise UserError(f"{record.run_dir}: other data or model than the first run ({', '.join(changed)}); "
                            "results on different test sets cannot be compared")
        data_settings = settings
        rows.append({
            "label": record.label, "seed": record.seed, "loss": saved.loss, "status": result.status,
            "epochs": result.epochs_done, "best_epoch": result.best_epoch,
            **result.test_metrics, **result.best_metrics,
            **{f"train_{k}": v for k, v in result.weight_stats.items()},
            **{f"start_{k}": v for k, v in result.start_metrics.items()},
            "seconds": round(result.seconds, 1), "rank_rule": folder.test_ranks().rule, "run_dir": str(record.run_dir),
            "params": json.dumps({k: config[k] for k in sorted(config) if k not in ("run_dir", "registry")}),
        })
    return pd.DataFrame(rows)


def percent(confidence: float) -> str:
    return f"{100 * confidence:.4g}%"


def summary_markdown(summary: pd.DataFrame, runs: pd.DataFrame, baseline_label: str | None, intro: str,
                     confidence: float = CONFIDENCE) -> str:
    """The report: mean ± std per configuration, then each one against the baseline."""
    def fmt(key, value):
        return f"{value:.2f}" if key.endswith("_mr") else f"{100 * value:.2f}"

    shown = headline(summary)
    table_rows = []
    for label, group in summary.groupby("label", sort=False):
        by = group.set_index("metric")
        row = {"configuration": label, "seeds": int(by.loc["r1_mean", "n"])}
        for key in shown:
            row[key] = f"{fmt(key, by.loc[key, 'mean'])} ± {fmt(key, by.loc[key, 'std'])}"
        weights = runs.loc[runs["label"] == label, "train_weight_std"] if "train_weight_std" in runs else None
        row["SANW w std"] = f"{weights.mean():.4f}" if weights is not None else ""
        ties = runs.loc[runs["label"] == label, "test_tie_share"] if "test_tie_share" in runs else None
        row["tie share"] = f"{100 * ties.mean():.2f}" if ties is not None and ties.notna().all() else ""
        row.update(zeroshot_cells(runs[runs["label"] == label]))
        table_rows.append(row)
    lines = [intro, "", "Recalls and mAP@10 in percent (mean ± std over seeds), tie-aware: tied candidates count "
             "in random order; MR in ranks. `SANW w std`: mean spread of the negative weights in the last "
             "training epoch (0 = plain InfoNCE). `tie share`: percent of test queries whose relevant score "
             "ties exactly with a candidate of different content (a sign of collapse)."
             + (" `zero-shot`: top-1 accuracy on the zero-shot set of the checkpoint evaluated on test, and its "
                "change from the starting model (points; forgetting when negative)." if "zero-shot" in table_rows[0]
                else ""),
             "", markdown_table(table_rows, ["configuration", "seeds", *shown, "SANW w std", "tie share",
                                             *(["zero-shot", "zs change"] if "zero-shot" in table_rows[0] else [])])]
    if len(shown) > len(HEADLINE):
        lines += ["", "`mp_*`: multi-positive recalls, where the data knows which captions truly describe which "
                  "images: a hit is any truly describing caption (i2t) or truly described image (t2i)."]
    lines += [f"\n**Warning:** `{label}` {text}" for label, text in uniform_weight_warnings(runs).items()]
    lines += [f"\n**Warning:** `{label}` {text}" for label, text in collapse_warnings(runs).items()]
    lines += strict_rule_warning(runs)
    if baseline_label and "diff" in summary:
        lines += ["", f"Against the baseline `{baseline_label}`: difference of means, {percent(confidence)} "
                  "interval from a paired bootstrap over test images and seeds (none for MR).", ""]
        diff_rows = []
        for label, group in summary[summary["label"] != baseline_label].groupby("label", sort=False):
            by = group.set_index("metric")
            row = {"configuration": label}
            for key in shown:
                d = by.loc[key]
                interval = (f" [{fmt(key, d['ci_low'])}, {fmt(key, d['ci_high'])}]"
                            if np.isfinite(d.get("ci_low", np.nan)) else "")
                row[key] = f"{'+' if d['diff'] >= 0 else ''}{fmt(key, d['diff'])}{interval}"
            row["R@1 mean verdict"] = verdict(by.loc["r1_mean"], "r1_mean")
            diff_rows.append(row)
        lines.append(markdown_table(diff_rows, ["configuration", *shown, "R@1 mean verdict"]))
        lines += power_markdown(summary, baseline_label)
    return "\n".join(lines) + "\n"


def zeroshot_cells(runs: pd.DataFrame) -> dict[str, str]:
    """A configuration's zero-shot top-1 at its test checkpoints and the change from the start
    (mean ± std over seeds, percent and points); nothing when its runs measured none."""
    if not {"test_zs_top1", "start_zs_top1"} <= set(runs) or runs["test_zs_top1"].isna().any():
        return {}
    change = 100 * (runs["test_zs_top1"] - runs["start_zs_top1"])
    spread = runs["test_zs_top1"].std(ddof=1) if len(runs) > 1 else 0.0
    return {"zero-shot": f"{100 * runs['test_zs_top1'].mean():.2f} ± {100 * spread:.2f}",
            "zs change": f"{change.mean():+.2f}"}


UNIFORM_WEIGHTS = 0.01  # weights that never leave 1 ± this trained as plain InfoNCE


def uniform_weight_warnings(runs: pd.DataFrame) -> dict[str, str]:
    """SANW configurations whose negative weights stayed within 1% of 1 in the last training epoch
    (the epoch means of each step's smallest and largest weight, averaged over seeds)."""
    if not {"train_weight_min", "train_weight_max"} <= set(runs):
        return {}
    warnings = {}
    for label, group in runs[runs["loss"] != "infonce"].groupby("label", sort=False):
        low, high = group["train_weight_min"].mean(), group["train_weight_max"].mean()
        if 1 - UNIFORM_WEIGHTS <= low and high <= 1 + UNIFORM_WEIGHTS:
            warnings[label] = (f"is {group['loss'].iloc[0]}, but its negative weights stayed within 1% of 1 (smallest "
                               f"{low:.4f}, largest {high:.4f}): it trained as plain InfoNCE would.")
    return warnings


COLLAPSE_TIE_SHARE = 0.01  # more test queries than this tied with other content: the model (partly) collapsed


def collapse_warnings(runs: pd.DataFrame) -> dict[str, str]:
    """Configurations where more than 1% of test queries (in either direction, mean over seeds)
    tie exactly with a candidate of different content: their embeddings (partly) collapsed."""
    if "test_tie_share" not in runs:
        return {}
    shares = runs.groupby("label", sort=False)["test_tie_share"].mean()
    return {label: (f"has {100 * share:.1f}% of its test queries tied with a candidate of different content: "
                    "its embeddings (partly) collapsed, and its recalls are those of random order among the tied.")
            for label, share in shares.items() if share > COLLAPSE_TIE_SHARE}


def strict_rule_warning(runs: pd.DataFrame) -> list[str]:
    """Runs scored by clipse before the tie-aware ranks, which counted ties for the relevant item."""
    old = runs.loc[runs["rank_rule"] != RANK_RULE, "run_dir"] if "rank_rule" in runs else []
    if not len(old):
        return []
    return [f"\n**Warning:** {len(old)} of {len(runs)} runs were scored under the strict-rank rule of earlier "
            "clipse versions (ties counted for the relevant item, so a collapsed model scores perfectly); their "
            "figures do not compare with the others'. Move their folders away and run the report again to retrain "
            "them: " + ", ".join(f"`{d}`" for d in old)]


def power_markdown(summary: pd.DataFrame, baseline_label: str) -> list[str]:
    """The power section: minimum detectable differences, and what a one-point effect needs."""
    shown = [key for key in headline(summary) if not key.endswith("_mr")]
    lines = ["", f"Power: the smallest difference each comparison detects with {int(POWER * 100)}% power at "
             f"two-sided alpha {ALPHA} (MDE, in points), from the observed spread of the paired per-seed "
             "differences and the test images' bootstrap variance; then what detecting a 1-point difference "
             "in R@1 mean would take (seeds on this test set, or test images with these seeds).", ""]
    rows, notes = [], []
    for label, group in summary[summary["label"] != baseline_label].groupby("label", sort=False):
        by = group.set_index("metric")
        r1 = by.loc["r1_mean"]
        if not np.isfinite(r1.get("mde", np.nan)):
            notes.append(f"`{label}`: one seed, so the seed-to-seed spread is unknown and no power is given; "
                         "train at least 2 seeds (--seeds).")
            continue
        row = {"configuration": label, **{f"MDE {key}": f"{100 * by.loc[key, 'mde']:.2f}" for key in shown}}
        row["seeds for 1 pt"] = _needed(r1["seeds_for_1pt"], "more test images needed")
        row["test images for 1 pt"] = _needed(r1["images_for_1pt"], "more seeds needed")
        rows.append(row)
        if verdict(r1, "r1_mean") == "no clear difference":
            powered = r1["mde"] <= EFFECT_OF_INTEREST
            notes.append(f"`{label}`: the R@1 mean interval contains zero, and this comparison "
                         f"{'was' if powered else 'was not'} powered to see a 1-point effect "
                         f"(MDE {100 * r1['mde']:.2f} points)" + ("." if powered else
                         ": no clear difference here does not mean no effect."))
    if rows:
        lines.append(markdown_table(rows, list(rows[0])))
    return lines + [f"\n{note}" for note in notes]


def _needed(value: float, otherwise: str) -> str:
    return f"{int(value)}" if np.isfinite(value) else f"not reachable ({otherwise})"


def plot_test_metrics(runs: pd.DataFrame, out: Path, metrics: tuple[str, ...] = ("r1_mean", "i2t_r1", "t2i_r1", "rsum")) -> Path:
    """Test metrics per configuration: one dot per seed, bar = mean."""
    long = runs.melt(id_vars=["label", "seed"], value_vars=[f"test_{m}" for m in metrics], var_name="metric")
    long["metric"] = long["metric"].str.removeprefix("test_")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        part = long[long["metric"] == metric]
        sns.barplot(data=part, x="label", y="value", hue="label", errorbar=None, alpha=0.45, ax=ax, legend=False)
        sns.stripplot(data=part, x="label", y="value", color="black", size=5, ax=ax, jitter=0.08)
        ax.set_title(f"test {metric}", fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(records: list[RunRecord], baseline_label: str | None, out_dir: Path, intro: str,
                 resamples: int = 2000, confidence: float = CONFIDENCE) -> dict[str, Path]:
    """runs.csv, summary.csv, summary.md and test_metrics.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = read_runs(records)
    summary = summarise(runs, baseline_label, resamples, confidence)
    paths = {"runs": out_dir / "runs.csv", "summary_csv": out_dir / "summary.csv", "summary_md": out_dir / "summary.md",
             "test_metrics": out_dir / "test_metrics.png"}
    runs.to_csv(paths["runs"], index=False)
    summary.to_csv(paths["summary_csv"], index=False)
    paths["summary_md"].write_text(summary_markdown(summary, runs, baseline_label, intro, confidence))
    plot_test_metrics(runs, paths["test_metrics"])
    return paths
