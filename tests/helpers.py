"""Helpers shared by the tests that drive studies."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from clipse.search.study import count_trials, open_storage, retried_numbers


def wait_for(predicate, timeout: float = 300, interval: float = 0.2) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def load_study(tmp_path: Path, study: str) -> optuna.Study:
    journal = tmp_path / "studies" / study / "journal.log"
    return optuna.load_study(study_name=study, storage=open_storage(str(journal)))


def epochs_done(tmp_path: Path, study: str, trial: int = 0) -> int:
    """Epochs a trial's run folder has finished (0 before its first)."""
    path = tmp_path / "studies" / study / "runs" / f"trial-{trial:05d}" / "epochs.csv"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


def was_retried(study: optuna.Study, trial: FrozenTrial) -> bool:
    return trial.number in retried_numbers(study.get_trials())


def assert_first_trial_retried(study: optuna.Study, total: int) -> tuple[FrozenTrial, FrozenTrial]:
    """The study reached `total` complete trials, and its lost first trial was failed and retried
    with the same parameters, resuming its run folder without training any epoch twice."""
    counts = count_trials(study)
    assert counts.complete == total and counts.running == 0 and counts.failed == 0
    lost = study.get_trials()[0]
    assert lost.state == TrialState.FAIL and was_retried(study, lost)
    retry = next(t for t in study.get_trials() if t.user_attrs.get("retry_of") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params
    rows = (Path(retry.user_attrs["run_dir"]) / "epochs.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3"]
    return lost, retry
