"""Training dynamics of runs: loss, temperature, learning rate and SANW weight statistics over
steps, and validation R@1 over epochs; one line per run, runs grouped by label.

    python -m analysis.dynamics RUN_DIR [RUN_DIR ...] [--out dynamics.png] [--label-by loss]
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from clipse.runs.folder import RunFolder  # noqa: E402

STEP_PANELS = [("loss", "training loss"), ("temperature", "temperature (1/scale)"), ("lr", "learning rate"),
               ("weight_std", "SANW weight std (0 = InfoNCE)"), ("share_suppressed", "share of negatives w < 0.9"),
               ("share_emphasised", "share of negatives w > 1.1")]
EPOCH_PANELS = [("val_i2t_r1", "val image->text R@1"), ("val_t2i_r1", "val text->image R@1")]
# Shown where the data knows its true false negatives (generated data).
TRUTH_STEP_PANELS = [("fn_share", "share of negatives truly matching (FN)"),
                     ("fn_recall", "FN recall: true FN weighted w < 0.9"),
                     ("fn_precision", "FN precision: w < 0.9 that are true FN")]
TRUTH_EPOCH_PANELS = [("val_mp_t2i_r1", "val multi-positive text->image R@1")]


def read_run(run_dir: Path, label: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = RunFolder(run_dir)
    steps, epochs = (pd.read_csv(path) if path.exists() else pd.DataFrame()
                     for path in (folder.training_csv, folder.epochs_csv))
    for frame in (steps, epochs):
        frame["run"] = run_dir.name
        frame["label"] = label
    return steps, epochs


def run_label(run_dir: Path, label_by: str) -> str:
    saved = RunFolder(run_dir).saved_config()
    if label_by == "run" or saved is None:
        return run_dir.name
    return str(saved.to_mapping().get(label_by, run_dir.name))


def plot_runs(runs: list[tuple[Path, str]], out: Path, title: str = "", panels: list[str] | None = None,
              dpi: int = 110) -> Path:
    """One figure, a panel per statistic (all of them unless ``panels`` names some); colour =
    label, one line per run."""
    frames = [read_run(run_dir, label) for run_dir, label in runs]
    steps = pd.concat([f[0] for f in frames], ignore_index=True)
    epochs = pd.concat([f[1] for f in frames], ignore_index=True)
    known = "fn_share" in steps
    chosen = [(steps, "step", key, name) for key, name in STEP_PANELS + (TRUTH_STEP_PANELS if known else [])] + \
             [(epochs, "epoch", key, name) for key, name in EPOCH_PANELS + (TRUTH_EPOCH_PANELS if known else [])]
    if panels is not None:
        chosen = [p for p in chosen if p[2] in panels]
    columns = min(4, len(chosen))
    rows = -(-len(chosen) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows + 0.4), squeeze=False)
    labels = list(dict.fromkeys(label for _, label in runs))
    palette = dict(zip(labels, sns.color_palette("tab10", max(1, len(labels)))))
    for ax, (frame, x, key, name) in zip(axes.flat, chosen):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x)
        if frame.empty or key not in frame:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        for (run, label), part in frame.groupby(["run", "label"], sort=False):
            ax.plot(part[x], part[key], color=palette[label], lw=1.0, alpha=0.8, marker="o" if x == "epoch" else None,
                    markersize=3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    if len(labels) > 1:
        handles = [plt.Line2D([0], [0], color=palette[label], lw=2) for label in labels]
        fig.legend(handles, labels, loc="upper right", ncol=min(6, len(labels)), frameon=False)
    if title:
        fig.suptitle(title, x=0.01, y=0.995, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if rows == 1 else 0.94))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


TRIAL_PANELS = ["loss", "weight_std", "val_i2t_r1", "val_t2i_r1"]


def plot_run(run_dir: Path, out: Path) -> Path:
    """The compact per-trial figure a search attaches to each trial."""
    return plot_runs([(Path(run_dir), Path(run_dir).name)], out, title=str(run_dir), panels=TRIAL_PANELS, dpi=72)


def plot_finished_run(folder: RunFolder) -> Path:
    """The run folder's ``dynamics.png`` (``plot_run``), drawn unless it is newer than the CSVs it
    shows: the search and the MLflow tracker both attach it, and it is drawn once."""
    csvs = [path.stat().st_mtime_ns for path in (folder.training_csv, folder.epochs_csv) if path.exists()]
    png = folder.dynamics_png
    if not png.exists() or png.stat().st_mtime_ns < max(csvs, default=0):
        plot_run(folder.path, png)
    return png
