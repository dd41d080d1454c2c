"""MLflow: one MLflow run per run folder, through ``MlflowClient`` (no global "active run").

The run is found again by its tag ``clipse.run_dir`` (the absolute run folder), so a resumed
run continues its MLflow run. A study is a run of its own (``study_run``) under which trials
and final runs nest through ``mlflow_parent_run``. Without ``mlflow_uri`` the store is a SQLite
file next to the run registry (``resolve_mlflow_uri``), its artifacts in ``mlartifacts/`` beside it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable
from urllib.parse import urlsplit

from clipse.trackers.base import Tracker, measurements, register_tracker

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from clipse.config import TrainConfig
    from clipse.runs.folder import RunFolder, TrainResult

DEFAULT_STORE = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
RUN_DIR_TAG, STUDY_TAG, STUDY_DIR_TAG, TRIAL_TAG, ROLE_TAG, STATUS_TAG = (
    "clipse.run_dir", "clipse.study", "clipse.study_dir", "clipse.trial", "clipse.role", "clipse.status")
PARENT_TAG = "mlflow.parentRunId"   # MLflow shows a run with this tag nested under that run
END_STATUS = {"completed": "FINISHED", "stopped": "KILLED", "diverged": "FAILED"}
SQLITE = "sqlite:///"


def resolve_mlflow_uri(source: TrainConfig | str | None, registry: str | Path | None = None) -> str:
    """The tracking URI to use, from a config (its ``mlflow_uri`` and ``registry``) or a URI
    (``registry`` needed when it is None). None means ``sqlite:///<registry's folder>/mlflow.db``;
    a relative SQLite file or plain path is made absolute (SLURM jobs may start in another
    folder); anything else MLflow accepts is kept as it is."""
    uri = source
    if hasattr(source, "mlflow_uri"):
        uri, registry = source.mlflow_uri, registry or source.registry
    if uri is None:
        if registry is None:
            raise ValueError("resolve_mlflow_uri: no URI and no registry to put the default store beside")
        return SQLITE + str(Path(registry).absolute().parent / DEFAULT_STORE)
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/") and len(uri) > len(SQLITE):
        return SQLITE + str(Path(uri[len(SQLITE):]).absolute())
    if "://" not in uri and not uri.startswith("file:"):
        return str(Path(uri).absolute())
    return uri


def without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def retries_unlogged(function):
    """Decorator: urllib3 logs every retry of a request as a warning of its own; while
    ``function`` runs they are left out (a tracker that gives up says so in one line)."""

    @functools.wraps(function)
    def quiet(*args, **kwargs):
        logger = logging.getLogger("urllib3.connectionpool")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            return function(*args, **kwargs)
        finally:
            logger.setLevel(level)

    return quiet


def mlflow_client(uri: str) -> MlflowClient:
    """A client of ``uri``, which must be resolved (see ``resolve_mlflow_uri``)."""
    # MLflow retries a failed HTTP request 7 times with exponential back-off and waits up to
    # 120 s for each answer: a tracking server that is down would stall a run for about four
    # minutes before its tracker is dropped. Two quick retries still ride out a blip; values
    # the user set in the environment win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    from clipse.util.locks import exclusive_lock

    if not uri.startswith(SQLITE):
        return MlflowClient(tracking_uri=uri)
    # Opening a SQLite store creates or upgrades its tables; workers that start together would
    # race at that (and all but one fail), so they take turns. The lock also makes the folder.
    store = Path(uri[len(SQLITE):])
    with exclusive_lock(store.with_name(store.name + ".lock")):
        return MlflowClient(tracking_uri=uri)


def experiment_for(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id; it is created when missing (with its artifacts beside a SQLite
    store, not in the current folder, MLflow's default)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (Path(uri[len(SQLITE):]).parent / LOCAL_ARTIFACTS).as_uri() if uri.startswith(SQLITE) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another worker created it meanwhile
        if experiment is None:
            raise
        return experiment.experiment_id


def _quoted(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def find_run(client: MlflowClient, experiment: str, tags: dict[str, str]) -> Run | None:
    """The newest live run of the experiment with all these tags."""
    condition = " and ".join(f"tags.`{key}` = {_quoted(value)}" for key, value in tags.items())
    runs = client.search_runs([experiment], filter_string=condition, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


@retries_unlogged
def study_run(uri: str, experiment: str, study_name: str, study_dir: str | Path | None = None) -> str:
    """The id of the study's own run (found by its tags, else created, named after the study),
    the parent of its trials and final runs. ``study_dir`` (the study's folder) tells apart
    studies of the same name in other folders. Raises what MLflow raises when it fails."""
    client = mlflow_client(uri)
    experiment_id = experiment_for(client, experiment, uri)
    tags = {STUDY_TAG: study_name, ROLE_TAG: "study"}
    if study_dir is not None:
        tags[STUDY_DIR_TAG] = str(Path(study_dir).absolute())
    run = find_run(client, experiment_id, tags) or client.create_run(experiment_id, run_name=study_name, tags=tags)
    return run.info.run_id


@retries_unlogged
def log_files(uri: str, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
    """Upload files (and folders, with their contents) as artifacts of the run, under
    ``artifact_path`` when given. Raises what MLflow raises when it fails."""
    client = mlflow_client(uri)
    for path in map(Path, paths):
        if path.is_dir():
            client.log_artifacts(run_id, str(path), f"{artifact_path}/{path.name}" if artifact_path else path.name)
        else:
            client.log_artifact(run_id, str(path), artifact_path)


def epoch_metric(column: str) -> str:
    """epochs.csv's own columns keep their names; those training.csv has too (samples_per_s, the
    weight statistics) get ``epoch_`` so the two histories do not mix."""
    return column if column == "train_loss" or column.startswith("val_") else f"epoch_{column}"


@register_tracker
class MlflowTracker(Tracker):
    """Settings as params; steps as metrics at their global step, epochs at their epoch; at
    the end the best value, test metrics, the CSVs and the dynamics plot, and the status."""

    name = "mlflow"
    package = "mlflow"
    pip = "mlflow>=3,<4"

    @classmethod
    def problems(cls, config: TrainConfig) -> list[str]:
        if config.mlflow_uri and urlsplit(config.mlflow_uri).password:
            return ["mlflow_uri: a password in the URL would be written to the run folder's config.yaml; "
                    "give it in MLFLOW_TRACKING_PASSWORD (with MLFLOW_TRACKING_USERNAME) instead"]
        return []

    def target(self, config: TrainConfig, folder: RunFolder) -> str:
        return without_credentials(resolve_mlflow_uri(config))

    @retries_unlogged
    def start(self, config: TrainConfig, folder: RunFolder) -> None:
        from mlflow.entities import Param

        uri = resolve_mlflow_uri(config)
        self.client = mlflow_client(uri)
        self.select_metric = config.select_metric
        experiment = experiment_for(self.client, config.mlflow_experiment, uri)
        run_dir = str(folder.path.absolute())
        # only a run resumed from a checkpoint continues its MLflow run: a new run in a folder
        # used before (deleted, or a re-created study) must not add to the old one's record
        resuming = config.resume and folder.last_checkpoint.exists()
        run = find_run(self.client, experiment, {RUN_DIR_TAG: run_dir}) if resuming else None
        if run is None:
            tags = {RUN_DIR_TAG: run_dir, ROLE_TAG: "run"}
            if config.study:
                tags[STUDY_TAG] = config.study
            if config.trial is not None:
                tags[TRIAL_TAG] = str(config.trial)
            if config.mlflow_parent_run:
                tags[PARENT_TAG] = config.mlflow_parent_run
            name = (f"{config.study}/trial-{config.trial}" if config.study and config.trial is not None
                    else folder.run_id(config.study))
            run = self.client.create_run(experiment, run_name=name, tags=tags)
            logged = {}
        else:  # a resumed run: params are fixed once logged, so only missing ones are added
            self.client.update_run(run.info.run_id, status="RUNNING")
            logged = run.data.params
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in config.to_mapping().items()
                                                   if key not in logged])

    def _log_metrics(self, values: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value, step in values])

    @retries_unlogged
    def log_steps(self, rows: list[dict]) -> None:
        self._log_metrics([(key, value, row["step"]) for row in rows for key, value in measurements(row).items()])

    @retries_unlogged
    def log_epoch(self, row: dict) -> None:
        self._log_metrics([(epoch_metric(key), value, row["epoch"]) for key, value in measurements(row).items()])

    @retries_unlogged
    def finish(self, result: TrainResult, folder: RunFolder) -> None:
        try:
            outcome = dict(result.test_metrics or {})
            if math.isfinite(result.best_value):
                outcome.update({f"best_{self.select_metric}": result.best_value, "best_epoch": result.best_epoch})
            self._log_metrics([(key, value, result.epochs_done) for key, value in outcome.items()])
            csvs = [path for path in (folder.training_csv, folder.epochs_csv) if path.exists()]
            if csvs:
                from clipse.runs.plots import plot_finished_run

                plot_finished_run(folder)
            for path in [*csvs, folder.dynamics_png]:
                if path.exists():
                    self.client.log_artifact(self.run_id, str(path))
        finally:  # ended even when an upload failed
            self.client.set_tag(self.run_id, STATUS_TAG, result.status)
            self.client.set_terminated(self.run_id, END_STATUS[result.status])

    @retries_unlogged
    def abort(self, error: BaseException) -> None:
        self.client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
