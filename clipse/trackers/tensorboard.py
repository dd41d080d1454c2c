"""TensorBoard: event files in ``<run folder>/tensorboard/``, so ``tensorboard --logdir
studies/<study>`` shows every trial of a study side by side."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from clipse.trackers.base import (
    TRAINING_COLUMNS,
    Tracker,
    measurements,
    register_tracker,
)

if TYPE_CHECKING:
    from clipse.config import TrainConfig
    from clipse.runs.folder import RunFolder, TrainResult

EVENTS_FOLDER = "tensorboard"


def step_tag(column: str) -> str:
    return f"train/{column}" if column in TRAINING_COLUMNS else f"sanw/{column}"


def epoch_tag(column: str) -> str:
    return f"val/{column[4:]}" if column.startswith("val_") else f"epoch/{column}"


def hparam_value(value):
    """What TensorBoard's hparams accept: numbers, strings and booleans (None as a string)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


@register_tracker
class TensorBoardTracker(Tracker):
    """Steps at their global step (train/*, sanw/*), epochs at their epoch number (val/*,
    epoch/*), and at the end the run's settings as hparams with its best value."""

    name = "tensorboard"
    package = "tensorboard"
    pip = "tensorboard>=2.14,<3"

    def target(self, config: TrainConfig, folder: RunFolder) -> str:
        return str(folder.path / EVENTS_FOLDER)

    def start(self, config: TrainConfig, folder: RunFolder) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(log_dir=str(folder.path / EVENTS_FOLDER))

    def log_steps(self, rows: list[dict]) -> None:
        for row in rows:
            for column, value in measurements(row).items():
                self.writer.add_scalar(step_tag(column), value, row["step"])
        self.writer.flush()

    def log_epoch(self, row: dict) -> None:
        for column, value in measurements(row).items():
            self.writer.add_scalar(epoch_tag(column), value, row["epoch"])
        self.writer.flush()

    def finish(self, result: TrainResult, folder: RunFolder) -> None:
        settings = {key: hparam_value(value) for key, value in self.config.to_mapping().items()}
        best = {f"hparam/best_{self.config.select_metric}": result.best_value} if math.isfinite(result.best_value) else {}
        # run_name "." keeps the hparams in this run's own folder (TensorBoard's default is a
        # new sub-folder per call, which would show up as a second run)
        self.writer.add_hparams(settings, best, run_name=".")
        self.writer.close()

    def pause(self) -> None:
        self.writer.close()

    def abort(self, error: BaseException) -> None:
        self.writer.close()
