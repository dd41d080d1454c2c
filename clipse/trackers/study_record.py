"""A study's own record in the trackers: for MLflow, the parent run of its trials and final runs.

The search and the final report open it once in the coordinator (``open_study_record``) and
hand its ``run_settings`` to every run they start, wherever it trains (local workers, SLURM
jobs): the resolved tracking URI (absolute, so a job in another folder finds the same store)
and the parent run's id. TensorBoard needs no study record: each run folder holds its own
event files, and ``tensorboard --logdir studies/<study>`` shows them together. Like the runs'
trackers, a study record that cannot be written costs one warning line, and the study goes on
without MLflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from clipse.trackers.base import parse_report_to

log = logging.getLogger(__name__)


@dataclass
class StudyRecord:
    run_settings: dict[str, Any]                # tracking settings every run of the study trains with
    mlflow_uri: str | None = None
    mlflow_run: str | None = None               # the study's MLflow run (None: no MLflow, or it failed to open)

    def _warn(self, stage: str, error: Exception) -> None:
        from clipse.trackers import failure_message

        log.warning(failure_message("mlflow", self.mlflow_uri, stage, error))

    def log_files(self, paths: Iterable[Path], artifact_path: str) -> None:
        if self.mlflow_run is None:
            return
        from clipse.trackers.mlflow import log_files

        try:
            log_files(self.mlflow_uri, self.mlflow_run, [p for p in paths if Path(p).exists()], artifact_path)
        except Exception as error:  # noqa: BLE001 - the report's files are written; only their copy failed
            self._warn("uploading the report", error)

    def close(self, status: str, metrics: Mapping[str, float] | None = None) -> None:
        """End the study's run with ``status`` (FINISHED once the study reached its total, KILLED
        after Ctrl-C, FAILED after an error; a later search reopens it), logging ``metrics``."""
        if self.mlflow_run is None:
            return
        from clipse.trackers.mlflow import mlflow_client

        try:
            client = mlflow_client(self.mlflow_uri)
            for key, value in (metrics or {}).items():
                client.log_metric(self.mlflow_run, key, value)
            client.set_terminated(self.mlflow_run, status)
        except Exception as error:  # noqa: BLE001
            self._warn("closing the study's run", error)


def open_study_record(tracking: Mapping[str, Any], registry: Path, study: str, study_dir: Path,
                      tags: Mapping[str, str] | None = None) -> StudyRecord:
    """The study's record, given the tracking settings of the command (``report_to``,
    ``mlflow_uri``, ``mlflow_experiment``) and the run registry the study's runs write to (the
    default MLflow store lies beside it). With ``tags`` (the search: they describe the study)
    the study's run is marked RUNNING; without (the final report) its status is left alone."""
    from clipse.config import TrainConfig

    config = TrainConfig.from_mapping(dict(tracking), "tracking settings").replace(registry=str(registry))
    names = parse_report_to(config.report_to)
    if "mlflow" not in names:
        return StudyRecord(dict(tracking))
    from clipse.trackers.mlflow import mlflow_client, resolve_mlflow_uri, study_run

    uri = resolve_mlflow_uri(config)
    record = StudyRecord({**tracking, "mlflow_uri": uri}, mlflow_uri=uri)
    try:
        run = study_run(uri, config.mlflow_experiment, study, study_dir)
        if tags is not None:
            client = mlflow_client(uri)
            client.update_run(run, status="RUNNING")
            for key, value in tags.items():
                client.set_tag(run, key, value)
    except Exception as error:  # noqa: BLE001 - whatever MLflow raises, the study goes on
        record._warn("starting the study's run", error)
        others = [name for name in names if name != "mlflow"]
        record.run_settings["report_to"] = ",".join(others) or "none"  # one warning, not one per run
        return record
    record.mlflow_run = run
    record.run_settings["mlflow_parent_run"] = run
    return record
