"""Where clipse keeps things: the cache, and the layout of the studies folder.

``CLIPSE_CACHE`` (default ``~/.cache/clipse``) holds the generated synthetic dataset and the
decoded-image and token caches; on a cluster point it at a filesystem every node sees.

The studies folder (default ``studies/``) holds ``run_registry.csv``, ``adhoc/runs/<run id>``
for runs trained outside a study, and one folder per study (``StudyFolder``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the clone (site-packages when installed)
DEFAULT_STUDIES_DIR = Path("studies")
REGISTRY_NAME = "run_registry.csv"
ADHOC_RUNS_DIR = DEFAULT_STUDIES_DIR / "adhoc" / "runs"


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPSE_CACHE", Path.home() / ".cache" / "clipse")).expanduser()


def registry_file(studies_dir: Path) -> Path:
    return Path(studies_dir) / REGISTRY_NAME


@dataclass(frozen=True)
class StudyFolder:
    """``<studies dir>/<study>/``: the journal (default storage), trial run folders, artifacts
    shown by optuna-dashboard, SLURM job folders and the final report."""

    path: Path

    @classmethod
    def of(cls, studies_dir: Path, name: str) -> "StudyFolder":
        return cls((Path(studies_dir) / name).absolute())  # absolute: SLURM jobs may start elsewhere

    journal = property(lambda self: self.path / "journal.log")
    artifacts = property(lambda self: self.path / "artifacts")
    slurm = property(lambda self: self.path / "slurm")
    ask_lock = property(lambda self: self.path / "ask.lock")  # held while a worker checks the total and takes a trial
    confirm = property(lambda self: self.path / "confirm")
    final = property(lambda self: self.path / "final")
    final_runs = property(lambda self: self.final / "runs")
    final_slurm = property(lambda self: self.final / "slurm")

    @property
    def registry(self) -> Path:
        return registry_file(self.path.parent)

    def trial_run(self, number: int) -> Path:
        return self.path / "runs" / f"trial-{number:05d}"

    def confirm_run(self, number: int, seed: int) -> Path:
        return self.confirm / "runs" / f"trial-{number:05d}-seed{seed}"

    def final_run(self, label: str, seed: int) -> Path:
        return self.final_runs / f"{label}-seed{seed}"
