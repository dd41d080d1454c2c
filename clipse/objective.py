"""The Optuna objective around the trainer, and the task a worker runs for one trial.

``run_trial_task`` is what every executor runs: it joins the study through the storage, takes
one trial (a queued retry first, else a new one from the sampler; after a SLURM requeue, the
trial its job was already running), trains it with heartbeats, and tells the study the result.

The objective reports the chosen validation metric after every epoch (pruning) and returns the
best epoch's value (the checkpoint the final report uses). A run whose loss turned non-finite
returns the best value it reached before (0 if none) and is marked ``status: diverged``.
Parameters that cannot train (e.g. m1 >= m2) are pruned before training, with the reason in
the ``rejected`` user attr. Every metric, the run folder and the SANW weight statistics are
stored in the trial's user attrs; ``training.csv`` and a dynamics plot become artifacts.
"""

from __future__ import annotations

import csv
import math
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from clipse.config import TrainConfig
from clipse.errors import UserError
from clipse.spaces import SearchSpace
from clipse.study import (OWNER_ATTR, RETRIED_ATTR, Heartbeat, count_trials, load_study, owner_record,
                          retry_lost_trial, stored_settings)
from clipse.train import EpochReport, train

DIVERGED_VALUE = 0.0


@dataclass
class TrialOutcome:
    number: int          # -1 when the task found no trial left to run
    state: str
    value: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class StudyRef:
    """Everything a worker needs to join a study (picklable, small)."""

    name: str
    storage: str
    study_dir: str
    session: str = ""
    total: int | None = None            # no task asks for a trial beyond the study's total
    heartbeat_s: float = 10.0
    extra_user_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact_dir(self) -> Path:
        return Path(self.study_dir) / "artifacts"


def trial_run_dir(ref: StudyRef, trial: optuna.Trial) -> Path:
    return Path(ref.study_dir) / "runs" / f"trial-{trial.number:05d}"


def base_config(ref: StudyRef, settings_base: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_mapping(settings_base, f"study {ref.name} settings")


def _replay_finished_epochs(trial: optuna.Trial, run_dir: Path, metric: str) -> None:
    """A resumed run continues after its last checkpoint: give the (new) trial the epochs it
    already has, so that its curve is whole and the pruner judges it on all of them."""
    epochs_csv = run_dir / "epochs.csv"
    if not epochs_csv.exists():
        return
    reported = trial.study._storage.get_trial(trial._trial_id).intermediate_values
    with open(epochs_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["epoch"]) not in reported:
                trial.report(float(row[metric]), step=int(row["epoch"]))


def objective(trial: optuna.Trial, ref: StudyRef, space: SearchSpace, metric: str, base: TrainConfig) -> float:
    params = space.suggest(trial)
    retry_dir = trial.user_attrs.get("run_dir")
    run_dir = Path(retry_dir) if retry_dir else trial_run_dir(ref, trial)
    trial.set_user_attr("run_dir", str(run_dir))
    config = TrainConfig.from_mapping(params, f"space {space.name}", base=base).replace(
        run_dir=str(run_dir), study=ref.name, trial=trial.number, resume=bool(retry_dir), progress=False,
        registry=str(Path(ref.study_dir).parent / "run_registry.csv"), select_metric=metric)
    try:
        config.validate()
    except UserError as exc:
        trial.set_user_attr("rejected", str(exc))
        raise optuna.TrialPruned(str(exc)) from None
    if retry_dir:
        _replay_finished_epochs(trial, run_dir, metric)

    def report(epoch: EpochReport) -> bool:
        trial.report(epoch.metrics[metric], step=epoch.epoch)
        return trial.should_prune()

    result = train(config, [report])
    trial.set_user_attr("status", result.status)
    trial.set_user_attr("epochs_done", result.epochs_done)
    trial.set_user_attr("seconds", round(result.seconds, 2))
    for key, value in {**result.best_metrics, **{f"weights_{k}": v for k, v in result.weight_stats.items()}}.items():
        trial.set_user_attr(key, value if math.isfinite(value) else None)
    _attach_artifacts(trial, ref, run_dir)
    if result.status == "stopped":
        raise optuna.TrialPruned(f"pruned after epoch {result.epochs_done}")
    if result.status == "diverged":
        trial.set_user_attr("diverged_step", result.diverged_step)
        return result.best_value if math.isfinite(result.best_value) else DIVERGED_VALUE
    return result.best_value


def _attach_artifacts(trial: optuna.Trial, ref: StudyRef, run_dir: Path) -> None:
    """training.csv and a dynamics plot, shown by optuna-dashboard --artifact-dir."""
    from analysis.dynamics import plot_run

    store_dir = ref.artifact_dir
    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    plot = run_dir / "dynamics.png"
    plot_run(run_dir, plot)
    for path in (run_dir / "training.csv", plot):
        if path.exists():
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)


def _own_previous_trial(study: optuna.Study, session: str) -> optuna.trial.FrozenTrial | None:
    """A SLURM job that was requeued runs again from the start: the trial it already took,
    if any (the latest one its job id owns)."""
    job = owner_record(session)["slurm_job"]
    if not job:
        return None
    owned = [t for t in study.get_trials(deepcopy=False)
             if (t.system_attrs.get(OWNER_ATTR) or {}).get("slurm_job") == job]
    return owned[-1] if owned else None


def _outcome(frozen: optuna.trial.FrozenTrial) -> TrialOutcome:
    return TrialOutcome(frozen.number, frozen.state.name, value=frozen.value, error=frozen.user_attrs.get("error"))


def _slurm_user_attrs() -> dict[str, Any]:
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    attrs = {"slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"]),
             "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"), "slurm_node": os.environ.get("SLURMD_NODENAME")}
    try:
        import submitit

        paths = submitit.JobEnvironment().paths
        attrs.update(slurm_stdout=str(paths.stdout), slurm_stderr=str(paths.stderr))
    except Exception:  # not a submitit job: the ids are enough
        pass
    return {k: v for k, v in attrs.items() if v is not None}


def run_trial_task(ref: StudyRef, max_retries: int = 2) -> TrialOutcome:
    """Take one trial of the study, train it, report it. Exceptions inside the trial become a
    FAIL with the error text in the trial's user attrs; Ctrl-C fails it as retryable and
    re-raises, so that a resumed search runs it again from its checkpoint."""
    study = load_study(ref.name, ref.storage)
    settings = stored_settings(study)
    space = SearchSpace.from_dict(settings.space_definition)
    base = base_config(ref, settings.base)
    previous = _own_previous_trial(study, ref.session)
    if previous is not None and previous.state == TrialState.RUNNING:
        trial = optuna.Trial(study, previous._trial_id)
    elif previous is not None and not previous.system_attrs.get(RETRIED_ATTR):
        return _outcome(previous)  # requeued after its trial had finished: nothing more to do
    else:
        counts = count_trials(study)
        if ref.total is not None and not counts.waiting and counts.finished + counts.running >= ref.total:
            return TrialOutcome(-1, "SKIPPED")
        trial = study.ask()
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, owner_record(ref.session))
    for key, value in {**ref.extra_user_attrs, **_slurm_user_attrs()}.items():
        trial.set_user_attr(key, value)
    with Heartbeat(study, trial._trial_id, ref.heartbeat_s):
        try:
            value = objective(trial, ref, space, settings.metric, base)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            return TrialOutcome(trial.number, "PRUNED", error=str(pruned) or None)
        except KeyboardInterrupt:
            frozen = study._storage.get_trial(trial._trial_id)
            retry_lost_trial(study, frozen, "interrupted (Ctrl-C)", max_retries)
            raise
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", text)
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            study.tell(trial, state=TrialState.FAIL)
            return TrialOutcome(trial.number, "FAIL", error=text)
    study.tell(trial, value)
    return TrialOutcome(trial.number, "COMPLETE", value=value)
