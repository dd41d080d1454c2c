"""Confirmation of a search's best trials with further seeds (``--confirm-top K --confirm-seeds S``).

A single-seed search ranks seeds as much as settings. After the study's trials, each of the K
best (feasible) trials is trained again with S seeds it has not used (the study's seed plus
``seeds_per_trial``, and on), as planned runs of the executor: resumable, and reused when the
command runs again. Every value is the run's best validation epoch, as a trial's is. The
**confirmed best** is the trial with the best mean over all its seeds (its own and the
confirmation runs'; a diverged run counts as 0, as a diverged trial does); it is stored in the
study's user attrs (``CONFIRMED_ATTR``) with the number of finished trials it saw, and
``clipse.final`` takes its configurations in that order as long as the study has no other
finished trials (a confirmation older than the study's last trials is ignored).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import optuna

from clipse.config import TrainConfig
from clipse.executors import ExecutorOptions
from clipse.search.objective import seed_value
from clipse.search.planned_runs import PlannedRun, train_planned
from clipse.search.study import (
    count_trials,
    ranked_trials,
    stored_settings,
    trial_settings,
)
from clipse.util.paths import StudyFolder

CONFIRMED_ATTR = "clipse:confirmed"   # study user attr: {"best": number, "trials": [per trial, best first]}


def confirmation_runs(study: optuna.Study, folder: StudyFolder, top: int, seeds: int,
                      tracking: dict[str, Any]) -> list[PlannedRun]:
    settings = stored_settings(study)
    base = settings.base_config()
    first = settings.seed + settings.seeds_per_trial  # the trials trained seeds seed .. first - 1
    runs = []
    for trial in ranked_trials(study)[:top]:
        config = TrainConfig.from_mapping({**trial_settings(study, trial), **tracking}, f"trial {trial.number}",
                                          base=base)
        for seed in range(first, first + seeds):
            runs.append(PlannedRun(f"trial-{trial.number}", seed, config.replace(
                seed=seed, run_dir=str(folder.confirm_run(trial.number, seed)), resume=True, progress=False,
                study=f"{study.study_name}/confirm", trial=trial.number, registry=str(folder.registry),
                select_metric=settings.metric).validate()))
    return runs


def own_seed_values(trial: optuna.trial.FrozenTrial, first_seed: int) -> list[tuple[int, float]]:
    """(seed, value) of the runs the trial itself trained."""
    if "seeds" in trial.user_attrs:
        return [(s["seed"], s["value"]) for s in trial.user_attrs["seeds"]]
    return [(first_seed, trial.value)]


def record_confirmation(study: optuna.Study, runs: list[PlannedRun]) -> dict[str, Any]:
    """The confirmed means of the trials the runs confirm, best first, stored in the study."""
    settings = stored_settings(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    table = []
    for number in dict.fromkeys(run.config.trial for run in runs):
        pairs = own_seed_values(trials[number], settings.seed) + [
            (run.seed, seed_value(run.folder.result())) for run in runs if run.config.trial == number]
        values = [value for _, value in pairs]
        table.append({"trial": number, "single_seed_value": trials[number].value, "mean": float(np.mean(values)),
                      "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                      "seeds": [seed for seed, _ in pairs], "values": values})
    table.sort(key=lambda row: (-row["mean"], row["trial"]))
    confirmed = {"best": table[0]["trial"], "trials": table, "finished_trials": count_trials(study).finished}
    study.set_user_attr(CONFIRMED_ATTR, confirmed)
    return confirmed


def confirm_best(study: optuna.Study, folder: StudyFolder, top: int, seeds: int, execution: ExecutorOptions,
                 tracking: dict[str, Any]) -> dict[str, Any] | None:
    """Train the missing confirmation runs and record the confirmed best; None when interrupted,
    empty when there is nothing to confirm."""
    runs = confirmation_runs(study, folder, top, seeds, tracking)
    if not runs:
        print(f"[confirm {study.study_name}] no feasible completed trial to confirm", file=sys.stderr)
        return {}
    if not train_planned(runs, execution, folder.confirm / "slurm", f"{study.study_name}-confirm",
                         f"confirm {study.study_name}", folder.confirm / "runs", diverged_counts=True):
        return None
    return record_confirmation(study, runs)


def current_confirmation(study: optuna.Study) -> dict[str, Any]:
    """The study's confirmation, unless trials finished since it was made (then empty)."""
    confirmed = study.user_attrs.get(CONFIRMED_ATTR, {})
    if not confirmed or confirmed.get("finished_trials") != count_trials(study).finished:
        return {}
    return confirmed


def confirmed_ranking(study: optuna.Study) -> list[int]:
    """Trial numbers by confirmed mean, best first (empty without a current confirmation)."""
    return [row["trial"] for row in current_confirmation(study).get("trials", [])]


def confirmed_row(study: optuna.Study, number: int) -> dict[str, Any] | None:
    return next((row for row in current_confirmation(study).get("trials", []) if row["trial"] == number), None)
