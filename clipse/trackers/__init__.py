"""Experiment trackers (``--report-to tensorboard,mlflow``; docs/reference/trackers.md): they copy a
run's step and epoch rows, settings and outcome to TensorBoard or MLflow as it trains.

The run folder stays the record: a tracker that fails, at its start or later, costs one warning
line and is dropped, and the run goes on without it. Every module of this package is imported
here, so a tracker is one module (see ``clipse.trackers.base``).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import TYPE_CHECKING

from clipse.config import SETTING_CHECKS
from clipse.trackers.base import (
    TRACKERS,
    Tracker,
    measurements,
    parse_report_to,
    register_tracker,
    tracker_names,
    tracking_problems,
)

if TYPE_CHECKING:
    from clipse.config import TrainConfig
    from clipse.runs.folder import RunFolder, TrainResult

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
SETTING_CHECKS.append(tracking_problems)  # TrainConfig.validate() checks --report-to through it

log = logging.getLogger(__name__)


def _causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    return chain


def failure_message(name: str, target: str, stage: str, error: BaseException) -> str:
    """One line: which tracker, where, what went wrong (the root cause of a connection failure)."""
    chain = _causes(error)
    unreachable = any(isinstance(e, (ConnectionError, TimeoutError)) for e in chain)
    shown = chain[-1] if unreachable else error
    detail = (str(shown).strip().splitlines() or [""])[0]
    detail = f"{type(shown).__name__}: {detail[:200]}" if detail else type(shown).__name__
    what = "cannot be reached" if unreachable else f"failed while {stage}"
    return f"{name} tracker at {target} {what} ({detail}); the run goes on without it (its CSVs are kept)"


class TrackerGroup:
    """The trackers of one run, as the trainer sees them: each call goes to every tracker still
    working; one that raises is reported once and dropped."""

    def __init__(self, trackers: list[tuple[Tracker, str]]):
        self._trackers = trackers   # (tracker, its target for messages)

    def _each(self, stage: str, call) -> None:
        for entry in list(self._trackers):
            tracker, target = entry
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 - whatever a tracker raises, training goes on
                log.warning(failure_message(tracker.name, target, stage, error))
                self._trackers.remove(entry)

    def start(self, config: TrainConfig, folder: RunFolder) -> None:
        self._each("starting", lambda tracker: tracker.start(config, folder))

    def log_steps(self, rows: list[dict]) -> None:
        if rows:
            self._each("logging steps", lambda tracker: tracker.log_steps(rows))

    def log_epoch(self, row: dict) -> None:
        self._each("logging an epoch", lambda tracker: tracker.log_epoch(row))

    def finish(self, result: TrainResult, folder: RunFolder) -> None:
        self._each("finishing", lambda tracker: tracker.finish(result, folder))
        self._trackers.clear()

    def pause(self) -> None:
        """The run paused and will be resumed: release what each tracker holds open."""
        self._each("pausing", lambda tracker: tracker.pause())
        self._trackers.clear()

    def abort(self, error: BaseException) -> None:
        """The trainer raised: close every record as failed or interrupted, best effort (the
        trainer re-raises ``error`` afterwards)."""
        self._each("closing after an error", lambda tracker: tracker.abort(error))
        self._trackers.clear()


def open_trackers(config: TrainConfig, folder: RunFolder) -> TrackerGroup:
    """Start the trackers ``config.report_to`` names (validated by ``TrainConfig.validate``)."""
    trackers = [TRACKERS[name]() for name in parse_report_to(config.report_to)]
    group = TrackerGroup([(tracker, tracker.target(config, folder)) for tracker in trackers])
    group.start(config, folder)
    return group


__all__ = ["TRACKERS", "Tracker", "TrackerGroup", "failure_message", "measurements", "open_trackers",
           "parse_report_to", "register_tracker", "tracker_names", "tracking_problems"]
