"""What an experiment tracker is to the trainer, and the registry that finds trackers by name.

A tracker copies what the trainer writes to the run folder to an outside tool as the run goes.
It is a subclass of ``Tracker`` in one module of this package, decorated with
``@register_tracker``: ``--report-to NAME`` then accepts it. The trainer calls it only after the
rows are in the CSVs, so the run folder stays complete whatever a tracker does.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from clipse.losses import STRENGTH_COLUMN

if TYPE_CHECKING:
    from clipse.config import TrainConfig
    from clipse.runs.folder import RunFolder, TrainResult

# The training.csv columns that describe the optimisation; every other value column of a step
# row is a statistic of the loss's negative weights (SANW).
TRAINING_COLUMNS = ("loss", "temperature", "lr", "grad_norm", "samples_per_s", STRENGTH_COLUMN)
# Columns of the CSV rows that are not measurements.
INDEX_COLUMNS = ("epoch", "step", "trained_by_pid")


class Tracker(ABC):
    """One tracker of one run: made without arguments, then ``start``-ed by the trainer."""

    name: ClassVar[str]
    package: ClassVar[str]   # the module it needs
    pip: ClassVar[str]       # what installs that module

    @classmethod
    def problems(cls, config: TrainConfig) -> list[str]:
        """Why ``config`` cannot use this tracker; empty when it can."""
        return []

    @abstractmethod
    def target(self, config: TrainConfig, folder: RunFolder) -> str:
        """Where it records, for messages (a folder, a URI without credentials)."""

    @abstractmethod
    def start(self, config: TrainConfig, folder: RunFolder) -> None:
        """Open (or, for a resumed run, reopen) the run's record."""

    @abstractmethod
    def log_steps(self, rows: list[dict]) -> None:
        """The rows just appended to training.csv (global step in ``step``)."""

    @abstractmethod
    def log_epoch(self, row: dict) -> None:
        """The row just appended to epochs.csv (1-based ``epoch``)."""

    @abstractmethod
    def finish(self, result: TrainResult, folder: RunFolder) -> None:
        """The run ended (its result.json and registry row are written): close the record."""

    def pause(self) -> None:
        """The run paused (``clipse.train.PAUSE``) and a resume will reopen the record: release
        what is held open, leave the record running."""

    @abstractmethod
    def abort(self, error: BaseException) -> None:
        """The trainer raised ``error``: close the record as failed or interrupted."""


def measurements(row: dict) -> dict[str, float]:
    """The numeric values of a CSV row, without its index columns."""
    return {key: float(value) for key, value in row.items()
            if key not in INDEX_COLUMNS and isinstance(value, (int, float)) and not isinstance(value, bool)}


TRACKERS: dict[str, type[Tracker]] = {}


def register_tracker(cls: type[Tracker]) -> type[Tracker]:
    """Class decorator: make a tracker known under ``cls.name``."""
    if not issubclass(cls, Tracker):
        raise TypeError(f"{cls!r}: a tracker subclasses Tracker")
    if cls.name in TRACKERS and TRACKERS[cls.name] is not cls:
        raise ValueError(f"a tracker named '{cls.name}' is already registered")
    TRACKERS[cls.name] = cls
    return cls


def tracker_names() -> tuple[str, ...]:
    return tuple(TRACKERS)


def parse_report_to(value: str) -> list[str]:
    """``"tensorboard, mlflow"`` -> the names in order, once each; ``none`` names no tracker."""
    names = [name.strip() for name in value.split(",")]
    return list(dict.fromkeys(name for name in names if name and name != "none"))


def tracking_problems(config: TrainConfig) -> list[str]:
    """Why the trackers ``config.report_to`` names cannot run: unknown names, missing packages,
    the trackers' own rules."""
    problems, value = [], config.report_to
    for name in parse_report_to(value):
        tracker = TRACKERS.get(name)
        if tracker is None:
            problems.append(f"report_to={value!r}: unknown tracker '{name}' (choose from none, "
                            f"{', '.join(tracker_names())}; several separated by commas)")
        elif importlib.util.find_spec(tracker.package) is None:
            problems.append(f"report_to={value!r}: the {name} tracker needs the Python package {tracker.package} "
                            f"(pip install '{tracker.pip}', or pip install 'clipse[trackers]')")
        else:
            problems += tracker.problems(config)
    return problems
