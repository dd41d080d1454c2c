"""WiSE-FT in the final report (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"):
each final run's starting weights and its fine-tuned best checkpoint mixed as
``(1 - alpha) * start + alpha * tuned`` for every alpha asked for, each mix evaluated on the test
split (retrieval) and on the run's zero-shot set. alpha 0 is the starting model, alpha 1 the
fine-tuned checkpoint, bit for bit (``clipse.models.interpolate_weights``).

Writes ``wiseft.csv`` (a row per run and alpha), ``wiseft.md`` (per configuration and alpha the
means over seeds, and the differences to the baseline at the same alpha) and ``wiseft.png`` (the
frontier: test R@1 mean against zero-shot top-1, one line per configuration from alpha 0 to 1).
Each run's rows are kept in its folder (``wiseft.csv``) and reused when the alphas, the best
checkpoint (size and time), the device kind and the rank rule are the same.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from clipse.evaluation.encoding import ImageNormalizer, evaluate_split  # noqa: E402
from clipse.evaluation.metrics import RANK_RULE  # noqa: E402
from clipse.evaluation.zeroshot import evaluate_zeroshot  # noqa: E402
from clipse.models import interpolate_weights  # noqa: E402
from clipse.report.summary import RunRecord  # noqa: E402
from clipse.runs.folder import RunFolder, atomic_write_text  # noqa: E402
from clipse.training.assembly import (  # noqa: E402
    autocast_for,
    dataset_for,
    model_for,
    resolve_device,
    split_tensors,
    zeroshot_for,
)
from clipse.util.errors import UserError  # noqa: E402
from clipse.util.tables import markdown_table  # noqa: E402

DEFAULT_ALPHAS = "0,0.25,0.5,0.75,1"
RUN_FILE = "wiseft.csv"


def parse_alphas(text: str) -> tuple[float, ...]:
    """``--wiseft-alphas``: comma-separated mixing weights in [0, 1], or ``none`` (no WiSE-FT)."""
    if text.strip().lower() == "none":
        return ()
    try:
        alphas = tuple(sorted({float(part) for part in text.split(",")}))
    except ValueError:
        raise UserError(f"--wiseft-alphas {text}: expected numbers separated by commas, or none") from None
    if not all(0.0 <= a <= 1.0 for a in alphas):
        raise UserError(f"--wiseft-alphas {text}: every alpha must lie in [0, 1]")
    return alphas


@torch.no_grad()
def wiseft_rows(run_dir: Path, alphas: tuple[float, ...]) -> list[dict]:
    """One finished run's metrics at each alpha (reused from its folder when already measured).
    Evaluated with the run's precision on this machine's device: on the kind of device it
    trained on, alpha 1 gives exactly its test metrics."""
    folder = RunFolder(run_dir)
    config = folder.saved_config()
    if config is None or not folder.best_checkpoint.exists():
        raise UserError(f"{run_dir}: not a finished run with a best checkpoint")
    device = resolve_device("auto" if config.device == "cuda" else config.device)
    try:
        autocast = autocast_for(device, config.precision)
    except UserError:  # amp_fp16 training evaluated off CUDA: in fp32 (alpha 1 then only near its test metrics)
        autocast = autocast_for(device, "fp32")
    stamp = folder.best_checkpoint.stat()
    key = f"{stamp.st_size}-{stamp.st_mtime_ns}-{device.type}-{RANK_RULE}"  # what the kept rows were made from
    kept = folder.path / RUN_FILE
    if kept.exists():
        table = pd.read_csv(kept)
        if tuple(table["alpha"]) == alphas and (table.get("made_from") == key).all():
            return table.drop(columns="made_from").to_dict(orient="records")
    torch.manual_seed(config.seed)  # a run from random init starts from the same draw as it trained from
    loaded = model_for(config)
    config.loss_function().prepare_model(loaded.model)  # parameters a loss adds (SigLIP's bias) are in both
    model = loaded.model.to(device)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    tuned = folder.load_best_weights(device)
    normalize = ImageNormalizer(loaded.mean, loaded.std, device)
    test = split_tensors(dataset_for(config), "test", loaded)
    zeroshot = zeroshot_for(config, loaded)
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate_weights(start, tuned, alpha))
        metrics, _ = evaluate_split(model, test, normalize, autocast)
        if zeroshot is not None:
            metrics.update(evaluate_zeroshot(model, zeroshot, normalize, autocast))
        rows.append({"alpha": alpha, **metrics})
    atomic_write_text(kept, pd.DataFrame(rows).assign(made_from=key).to_csv(index=False))
    return rows


def write_wiseft(records: list[RunRecord], baseline_label: str, out_dir: Path,
                 alphas: tuple[float, ...]) -> dict[str, Path]:
    """wiseft.csv, wiseft.md and wiseft.png in ``out_dir`` (nothing when ``alphas`` is empty)."""
    if not alphas:
        return {}
    rows = [{"label": r.label, "seed": r.seed, **row} for r in records for row in wiseft_rows(r.run_dir, alphas)]
    table = pd.DataFrame(rows)
    paths = {"wiseft_csv": out_dir / "wiseft.csv", "wiseft_md": out_dir / "wiseft.md",
             "wiseft_plot": out_dir / "wiseft.png"}
    table.to_csv(paths["wiseft_csv"], index=False)
    paths["wiseft_md"].write_text(wiseft_markdown(table, baseline_label))
    plot_frontier(table, paths["wiseft_plot"])
    return paths


def _axes(table: pd.DataFrame) -> list[str]:
    return ["r1_mean"] + (["zs_top1"] if "zs_top1" in table and table["zs_top1"].notna().all() else [])


def wiseft_markdown(table: pd.DataFrame, baseline_label: str) -> str:
    axes = _axes(table)
    names = {"r1_mean": "test R@1 mean", "zs_top1": "zero-shot top-1"}
    means = table.groupby(["label", "alpha"], sort=False)[axes].mean()
    seeds = table.groupby("label", sort=False)["seed"].nunique()
    lines = ["## WiSE-FT: mixing the starting and the fine-tuned weights", "",
             "Each run's weights (1 - alpha) * start + alpha * fine-tuned, evaluated on the test split and the "
             "zero-shot set; alpha 0 is the starting model, alpha 1 the fine-tuned checkpoint. Percent, mean over "
             "seeds; the differences are to the baseline at the same alpha and seeds (paired).", ""]
    shown = []
    for (label, alpha), row in means.iterrows():
        entry = {"configuration": label, "seeds": int(seeds[label]), "alpha": f"{alpha:g}",
                 **{names[a]: f"{100 * row[a]:.2f}" for a in axes}}
        if label != baseline_label and (baseline_label, alpha) in means.index:
            base = means.loc[(baseline_label, alpha)]
            entry.update({f"diff {names[a]}": f"{100 * (row[a] - base[a]):+.2f}" for a in axes})
        shown.append(entry)
    columns = ["configuration", "seeds", "alpha", *[names[a] for a in axes], *[f"diff {names[a]}" for a in axes]]
    lines.append(markdown_table(shown, columns))
    if len(axes) == 2:
        lines += ["", *frontier_verdicts(means, baseline_label)]
    return "\n".join(lines) + "\n"


def frontier_verdicts(means: pd.DataFrame, baseline_label: str) -> list[str]:
    """Per configuration: at which alphas its mean point lies beyond the baseline's (at least as
    good in both retrieval and zero-shot, better in one), inside it, on neither side, or on it;
    it moves the frontier only when every alpha that differs differs the same way. Means over
    seeds, without an interval: the frontier is a description, the summary's intervals the test."""
    labels = [label for label in dict.fromkeys(means.index.get_level_values(0)) if label != baseline_label]
    if baseline_label not in means.index.get_level_values(0):
        return []
    verdicts = []
    for label in labels:
        found: dict[str, list[float]] = {"beyond": [], "inside": [], "mixed": [], "equal": []}
        for alpha in means.loc[label].index:
            if (baseline_label, alpha) not in means.index:
                continue
            diff = means.loc[(label, alpha)] - means.loc[(baseline_label, alpha)]
            kind = ("equal" if (diff == 0).all() else "beyond" if (diff >= 0).all() else
                    "inside" if (diff <= 0).all() else "mixed")
            found[kind].append(alpha)
        decided = [kind for kind in ("beyond", "inside", "mixed") if found[kind]]
        verdict = ("moves the frontier outward" if decided == ["beyond"] else
                   "moves the frontier inward" if decided == ["inside"] else
                   "does not move the frontier one way" if decided else "has the baseline's frontier")
        parts = [f"{text} at alpha {_list(found[kind])}" for kind, text in (
            ("beyond", "beyond the baseline's (as good on both axes, better on one)"),
            ("inside", "inside it (as bad on both, worse on one)"),
            ("mixed", "better on one axis and worse on the other"), ("equal", "equal")) if found[kind]]
        verdicts.append(f"- `{label}` {verdict}: " + "; ".join(parts) + ".")
    return verdicts


def _list(alphas: list[float]) -> str:
    return ", ".join(f"{a:g}" for a in alphas)


def plot_frontier(table: pd.DataFrame, out: Path) -> Path:
    """Test R@1 mean against zero-shot top-1 (or against alpha without a zero-shot set), a line
    per configuration through its alphas, mean over seeds with the seeds' std as error bars."""
    axes = _axes(table)
    x_key = axes[1] if len(axes) == 2 else "alpha"
    grouped = table.groupby(["label", "alpha"], sort=False)
    means, spreads = grouped[axes].mean(), grouped[axes].std(ddof=1).fillna(0.0)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label in dict.fromkeys(table["label"]):
        m, s = means.loc[label], spreads.loc[label]
        x = 100 * m[x_key] if x_key != "alpha" else np.asarray(m.index)
        ax.errorbar(x, 100 * m["r1_mean"], yerr=100 * s["r1_mean"],
                    xerr=100 * s[x_key] if x_key != "alpha" else None, marker="o", capsize=3, label=label)
        if x_key != "alpha":
            for alpha, xi, yi in zip(m.index, x, 100 * m["r1_mean"]):
                ax.annotate(f"{alpha:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("zero-shot top-1 (%)" if x_key != "alpha" else "alpha (0: start, 1: fine-tuned)")
    ax.set_ylabel("test R@1 mean (%)")
    ax.set_title("WiSE-FT: start (alpha 0) to fine-tuned (alpha 1)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
