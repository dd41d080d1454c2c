"""Figures of a search, drawn by Optuna's own ``optuna.visualization.matplotlib``:

- ``search_history.png``: every completed trial's value and the best so far (with several
  objectives: the Pareto front instead);
- ``param_importances.png``: fANOVA importances of the parameters (per objective);
- ``intermediate_values.png``: each trial's per-epoch curve, where pruning decided (one objective);
- ``timeline.png``: when each trial ran and how it ended (workers, retries, pruning);
- ``sanw_slice.png``: the objective against each SANW parameter (every parameter for a space
  without loss parameters).

    python -m analysis.search_plots STUDY_NAME --storage studies/NAME/journal.log [--out DIR]
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization.matplotlib as optuna_plots  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from clipse.config import name_is_loss_key  # noqa: E402
from clipse.search.study import stored_settings  # noqa: E402

log = logging.getLogger(__name__)


def _save(draw: Callable[[], object], out: Path, title: str, missing: str | None = None) -> Path:
    """Draw with Optuna into a new figure and save it. A study too small for the figure (no
    completed trial: ``missing`` says so; a parameter that never varied, ...) gets a figure
    that says why, and a warning line."""
    plt.close("all")
    verbosity = optuna.logging.get_verbosity()
    try:
        if missing:
            raise ValueError(missing)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # Optuna's own notes on small studies
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            axes = draw()
        figure = np.atleast_1d(axes).flat[0].figure
    except (ValueError, RuntimeError) as exc:
        log.warning("%s not drawn: %s", out.name, exc)
        figure, ax = plt.subplots(figsize=(7.5, 4))
        ax.text(0.5, 0.5, f"not drawn: {exc}", ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
    finally:
        optuna.logging.set_verbosity(verbosity)
    figure.suptitle(title, fontsize=10)
    figure.set_size_inches(max(figure.get_size_inches()[0], 7.5), max(figure.get_size_inches()[1], 4))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110, bbox_inches="tight")
    plt.close("all")
    return out


def _mean_of_values(trial: optuna.trial.FrozenTrial) -> float:
    return float(np.mean(trial.values))


def plot_search(study: optuna.Study, out_dir: Path) -> dict[str, Path]:
    """The search's figures in ``out_dir``; returns name -> path."""
    settings = stored_settings(study)
    name, metrics = study.study_name, settings.metrics
    several = len(metrics) > 1
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    missing = None if completed else "the study has no completed trial yet"
    # a slice needs one target; with several objectives it shows their mean
    target = {"target": _mean_of_values, "target_name": "mean of " + ", ".join(metrics)} if several else {
        "target_name": metrics[0]}
    space_params = list(settings.space_definition["params"])
    sanw = [p for p in space_params if name_is_loss_key(p)] or space_params
    files = {}
    if several:
        files["search_history"] = _save(lambda: optuna_plots.plot_pareto_front(study, target_names=metrics),
                                        out_dir / "search_history.png", f"Pareto front of '{name}'", missing)
    else:
        files["search_history"] = _save(lambda: optuna_plots.plot_optimization_history(study, target_name=metrics[0]),
                                        out_dir / "search_history.png", f"search history of '{name}'", missing)
        files["intermediate_values"] = _save(lambda: optuna_plots.plot_intermediate_values(study),
                                             out_dir / "intermediate_values.png",
                                             f"per-epoch {metrics[0]} of each trial of '{name}' (pruning)")
    naming = {} if several else {"target_name": metrics[0]}  # several: Optuna names each by the study's metric names
    files["param_importances"] = _save(
        lambda: optuna_plots.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), **naming),
        out_dir / "param_importances.png", f"parameter importances of '{name}' ({completed} completed trials)",
        missing)
    files["timeline"] = _save(lambda: optuna_plots.plot_timeline(study), out_dir / "timeline.png",
                              f"timeline of '{name}'")
    files["sanw_slice"] = _save(lambda: optuna_plots.plot_slice(study, params=sanw, **target),
                                out_dir / "sanw_slice.png", f"objective against {', '.join(sanw)} in '{name}'", missing)
    return files
