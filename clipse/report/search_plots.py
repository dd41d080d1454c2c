"""Plots of a search: optimisation history (every trial's value, pruned trials at the value
they were stopped at, best so far) and parameter importances (Optuna's fANOVA).

    python -m analysis.search_plots STUDY_NAME --storage studies/NAME/journal.log [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from clipse.errors import cli_main  # noqa: E402
from clipse.study import SETTINGS_ATTR, load_study, secure_storage  # noqa: E402


def plot_history(study: optuna.Study, out: Path) -> Path:
    trials = study.get_trials(deepcopy=False)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.scatter([t.number for t in pruned], [max(t.intermediate_values.values()) for t in pruned], marker="x",
               color="grey", label="pruned (best epoch before stopping)", s=22)
    ax.scatter([t.number for t in complete], [t.value for t in complete], color="tab:blue", label="complete", s=22)
    best, running = [], float("-inf")
    for t in sorted(complete, key=lambda t: t.number):
        running = max(running, t.value)
        best.append((t.number, running))
    if best:
        ax.step(*zip(*best), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(study.user_attrs.get(SETTINGS_ATTR, {}).get("metric", "objective"))
    ax.set_title(f"search history of '{study.study_name}'", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_importances(study: optuna.Study, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)) \
            if len(complete) >= 2 else {}
    except (RuntimeError, ValueError):  # e.g. every parameter constant among completed trials
        importances = {}
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    else:
        ax.text(0.5, 0.5, f"not enough completed trials ({len(complete)}) to estimate importances",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"parameter importances of '{study.study_name}' ({len(complete)} completed trials)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.search_plots", description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--storage", required=True, help="RDB URL or journal file path")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    with secure_storage(args.storage) as storage:
        study = load_study(args.study, storage)
        print(plot_history(study, args.out / "search_history.png"))
        print(plot_importances(study, args.out / "param_importances.png"))
    return 0
