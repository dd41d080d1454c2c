"""Helpers shared by the tests that drive studies."""

from __future__ import annotations

import time
from pathlib import Path

import optuna

from clipse.study import open_storage


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
