"""The Optuna objective around the trainer, and the task a worker runs for one trial.

``run_trial_task`` is what every executor runs: it joins the study through the storage, takes
one trial (a queued retry first, else a new one from the sampler; after a SLURM requeue, the
trial its job was already running), trains it with heartbeats, and tells the study the result.

The objective reports the chosen validation metric after every epoch (pruning) and returns the
best epoch's value (the checkpoint the final report uses). A study of several objectives is not
pruned; its checkpoint is the epoch with the best ``val_r1_mean`` (the trainer's default) and it
returns each objective's value at that epoch. A run whose loss turned non-finite
returns the best value it reached before (0 if none) and is marked ``status: diverged``.
Parameters that cannot train (e.g. m1 >= m2) are pruned before training, with the reason in
the ``rejected`` user attr. Every metric, the run folder and the SANW weight statistics are
stored in the trial's user attrs; ``training.csv`` and a dynamics plot become artifacts.
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from clipse.config import TrainConfig
from clipse.executors import worker_environment
from clipse.runs.folder import RunFolder, TrainResult
from clipse.search.outages import STORAGE_GRACE_S
from clipse.search.spaces import SearchSpace
from clipse.search.study import (
    HEARTBEAT_INTERVAL_S,
    OWNER_ATTR,
    RUN_DIR_ATTR,
    WEIGHT_CONSTRAINT,
    ZEROSHOT_CONSTRAINT,
    Heartbeat,
    StudySettings,
    load_study,
    retried_numbers,
    retry_lost_trial,
    stored_settings,
    take_back,
    take_trial,
)
from clipse.trackers import tracking_problems
from clipse.training.trainer import PAUSE, EpochReport, finish_paused, train
from clipse.util.errors import RankLost, StorageUnreachable, UserError, is_storage_full
from clipse.util.paths import StudyFolder

DIVERGED_VALUE = 0.0
log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    number: int          # -1 when the task found no trial left to run
    state: str
    value: float | list[float] | None = None   # one value per objective when there are several
    error: str | None = None


@dataclass(frozen=True)
class StudyRef:
    """Everything a worker needs to join a study (picklable, small, and free of passwords)."""

    name: str
    storage: str
    study_dir: str
    session: str = ""
    total: int | None = None            # no task asks for a trial beyond the study's total
    heartbeat_s: float = HEARTBEAT_INTERVAL_S
    tracking: tuple[tuple[str, Any], ...] = ()  # tracking settings of every trial (clipse.trackers.study_record)
    storage_grace_s: float = STORAGE_GRACE_S    # how long the storage may be unreachable before the worker stops

    @property
    def folder(self) -> StudyFolder:
        return StudyFolder(Path(self.study_dir))


def objective(trial: optuna.Trial, ref: StudyRef, space: SearchSpace, settings: StudySettings,
              reported: frozenset[int] = frozenset()) -> float | list[float]:
    """``reported``: the epochs a retried trial's intermediate values hold already."""
    metrics, base = settings.metrics, settings.base_config()
    params = space.suggest(trial)
    retry_dir = trial.user_attrs.get(RUN_DIR_ATTR)
    run_dir = Path(retry_dir) if retry_dir else ref.folder.trial_run(trial.number)
    trial.set_user_attr(RUN_DIR_ATTR, str(run_dir))
    config = TrainConfig.from_mapping({**params, **dict(ref.tracking)}, f"space {space.name}", base=base).replace(
        run_dir=str(run_dir), study=ref.name, trial=trial.number, resume=bool(retry_dir), progress=False,
        registry=str(ref.folder.registry), **({} if len(metrics) > 1 else {"select_metric": metrics[0]}))
    untrackable = tracking_problems(config)
    if untrackable:  # a node without a tracker's package: the trial trains, unrecorded there
        log.warning("trial %d trains without its trackers: %s", trial.number, untrackable[0])
        config = config.replace(report_to="none")
    try:
        config.validate()
    except UserError as exc:
        trial.set_user_attr("rejected", str(exc))
        raise optuna.TrialPruned(str(exc)) from None

    if settings.seeds_per_trial > 1:
        results, status = train_seeds(trial, config, settings.seeds_per_trial, metrics, reported)
        if not results:  # pruned on a retry before any seed trained again
            raise optuna.TrialPruned("pruned")
    else:
        def report(epoch: EpochReport) -> bool:
            trial.report(epoch.metrics[metrics[0]], step=epoch.epoch)
            return trial.should_prune()

        if len(metrics) == 1:
            report_missing_epochs(trial, run_dir, metrics[0], reported)
        results = [train(config, [report] if len(metrics) == 1 else [])]
        status = results[0].status
    trial.set_user_attr("status", status)
    trial.set_user_attr("epochs_done", min(r.epochs_done for r in results))
    trial.set_user_attr("seconds", round(sum(r.seconds for r in results), 2))
    best_metrics = _mean_of([r.best_metrics for r in results])
    weight_stats = _mean_of([r.weight_stats for r in results])
    for key, value in {**best_metrics, **{f"weights_{k}": v for k, v in weight_stats.items()}}.items():
        trial.set_user_attr(key, value if math.isfinite(value) else None)
    if settings.min_weight_std > 0:  # Optuna's constraint: never the best, and TPE, GP, NSGA-II avoid such points
        trial.set_constraint(WEIGHT_CONSTRAINT, settings.weight_shortfall(weight_stats.get("weight_std")))
    start_metrics = _mean_of([r.start_metrics for r in results])
    if "zs_top1" in start_metrics:
        trial.set_user_attr("start_zs_top1", start_metrics["zs_top1"])
    if settings.max_zeroshot_drop is not None:  # at the checkpoint the trial's value comes from
        trial.set_constraint(ZEROSHOT_CONSTRAINT, settings.zeroshot_excess(start_metrics.get("zs_top1"),
                                                                           best_metrics.get("val_zs_top1")))
    for result in results:
        _attach_artifacts(trial, ref, RunFolder(result.run_dir))
    if status == "stopped":
        raise optuna.TrialPruned(f"pruned after epoch {min(r.epochs_done for r in results)}")
    if status == "diverged":
        trial.set_user_attr("diverged_step", next(r.diverged_step for r in results if r.status == "diverged"))
    if len(metrics) > 1:  # each objective at the checkpoint's epoch (per seed), averaged over seeds
        return [float(np.mean([r.best_metrics.get(m, DIVERGED_VALUE) for r in results])) for m in metrics]
    return float(np.mean([seed_value(r) for r in results]))


def report_missing_epochs(trial: optuna.Trial, run_dir: Path, metric: str, reported: frozenset[int]) -> None:
    """A retried trial's epochs that its run folder finished but the storage never got (a worker
    that stopped between the checkpoint and the report, or during a storage outage), reported
    before training goes on, so that the pruner and the dashboard see every epoch in order."""
    for row in RunFolder(run_dir).epoch_rows():
        if int(row["epoch"]) not in reported:
            trial.report(float(row[metric]), step=int(row["epoch"]))


def seed_value(result: TrainResult) -> float:
    """What one run contributes to its trial: its best epoch's value (0 if it never had one)."""
    return result.best_value if math.isfinite(result.best_value) else DIVERGED_VALUE


def _mean_of(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over the seeds that have the key (NaN stays NaN)."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: float(np.mean([row[key] for row in rows if key in row])) for key in keys}


def train_seeds(trial: optuna.Trial, config: TrainConfig, count: int, metrics: list[str],
                reported: frozenset[int] = frozenset()) -> tuple[list[TrainResult], str]:
    """``--seeds-per-trial``: the trial's parameters trained with ``count`` seeds (the study's seed,
    then the next ones), each in ``<trial run folder>/seed-<seed>``, epoch by epoch in lockstep:
    every seed trains an epoch (pausing after it), then the mean over seeds of that epoch's
    metric goes to the pruner. A seed that diverged counts with its best value so far. Every
    call resumes, so a retried trial continues each seed from its last checkpoint (and reports
    only the epochs its intermediate values lack). A pruned trial's seeds end as stopped runs.
    The seeds, their run folders and values are kept in the trial's ``seeds`` user attr."""
    configs = [config.replace(seed=config.seed + k, run_dir=str(Path(config.run_dir) / f"seed-{config.seed + k}"),
                              resume=True) for k in range(count)]
    # A retried trial: finished seeds are done; a paused one may be ahead of the others (it is
    # not trained again until they catch up).
    results: list[TrainResult | None] = [RunFolder(c.run_dir).result() for c in configs]
    status = "completed"
    for epoch in range(1, config.epochs + 1):
        for k, seed_config in enumerate(configs):
            behind = len(RunFolder(seed_config.run_dir).epoch_rows()) < epoch
            if behind and (results[k] is None or results[k].status == "paused"):
                results[k] = train(seed_config, [_pause_after(epoch, config.epochs)])
        if len(metrics) == 1 and epoch not in reported:
            trial.report(float(np.mean([_value_at(r, c, epoch, metrics[0]) for r, c in zip(results, configs)])),
                         step=epoch)
            if trial.should_prune():
                status = "stopped"
                results = [finish_paused(c, r) if r is not None and r.status == "paused" else r
                           for r, c in zip(results, configs)]
                break
    else:  # every seed to its end (a seed that was ahead has not returned its result yet)
        results = [r if r is not None and r.status != "paused" else train(c, []) for r, c in zip(results, configs)]
    trial.set_user_attr("seeds", [{"seed": c.seed, "run_dir": c.run_dir, "status": r.status if r else "paused",
                                   "value": seed_value(r) if r else None} for c, r in zip(configs, results)])
    if status == "stopped":
        return [r for r in results if r is not None], status
    if any(r.status == "diverged" for r in results):
        status = "diverged"
    return results, status


def _pause_after(epoch: int, epochs: int):
    return lambda report: PAUSE if report.epoch >= epoch and report.epoch < epochs else None


def _value_at(result: TrainResult | None, config: TrainConfig, epoch: int, metric: str) -> float:
    """A seed's ``metric`` after ``epoch`` (from its epochs.csv); its best value when it diverged before."""
    rows = [row for row in RunFolder(config.run_dir).epoch_rows() if int(row["epoch"]) == epoch]
    if rows:
        return float(rows[0][metric])
    return seed_value(result)


def _attach_artifacts(trial: optuna.Trial, ref: StudyRef, run: RunFolder) -> None:
    """training.csv and a dynamics plot, shown by optuna-dashboard --artifact-dir."""
    from clipse.runs.plots import plot_finished_run

    store_dir = ref.folder.artifacts
    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    plot_finished_run(run)
    for path in (run.training_csv, run.dynamics_png):
        if path.exists():
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _outcome(frozen: optuna.trial.FrozenTrial) -> TrialOutcome:
    values = frozen.values or []
    return TrialOutcome(frozen.number, frozen.state.name, value=values[0] if len(values) == 1 else values or None,
                        error=frozen.user_attrs.get("error"))


def run_trial_task(ref: StudyRef, max_retries: int) -> TrialOutcome:
    """Take one trial of the study, train it, report it. Exceptions inside the trial become a
    FAIL with the error text in the trial's user attrs; Ctrl-C fails it as retryable and
    re-raises, so that a resumed search runs it again from its checkpoint. Any write that failed
    for want of space (a checkpoint, a row, a plot) fails the trial with that line and queues a
    retry (within the study's retries), which resumes from the last checkpoint."""
    environment = worker_environment()
    study = load_study(ref.name, ref.storage, ref.storage_grace_s)
    settings = stored_settings(study)
    space = SearchSpace.from_dict(settings.space_definition)
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if environment.was(t.user_attrs.get(OWNER_ATTR) or {})]
    previous = mine[-1] if mine else None
    if previous is not None and previous.state == TrialState.RUNNING:
        trial = take_back(study, previous)  # restarted by the backend: continue the same trial
    elif previous is not None and previous.number not in retried_numbers(trials):
        return _outcome(previous)  # restarted after its trial had finished: nothing more to do
    else:
        trial = take_trial(study, ref.total, ref.folder.ask_lock, settings.build_sampler)
        if trial is None:
            return TrialOutcome(-1, "SKIPPED")
    trial.set_user_attr(OWNER_ATTR, {**environment.identity(), "session": ref.session})
    for key, value in environment.public_attrs().items():
        trial.set_user_attr(key, value)
    with Heartbeat(trial, ref.heartbeat_s):
        try:
            value = objective(trial, ref, space, settings, frozenset(_frozen(study, trial.number).intermediate_values))
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            return TrialOutcome(trial.number, "PRUNED", error=str(pruned) or None)
        except KeyboardInterrupt:
            retry_lost_trial(study, _frozen(study, trial.number), "interrupted (Ctrl-C)", max_retries,
                             ref.folder.ask_lock)
            raise
        except StorageUnreachable:
            raise  # nothing can be written: the trial stays RUNNING, and the next run retries it
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", text)
            # The run folder keeps its last checkpoint: a retry resumes (once space is freed, on sound ranks).
            if is_storage_full(exc) or isinstance(exc, RankLost):
                retry_lost_trial(study, _frozen(study, trial.number), text, max_retries, ref.folder.ask_lock)
                return TrialOutcome(trial.number, "FAIL", error=text)
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            study.tell(trial, state=TrialState.FAIL)
            return TrialOutcome(trial.number, "FAIL", error=text)
    study.tell(trial, value)
    return TrialOutcome(trial.number, "COMPLETE", value=value)
