"""Training one run: ``train(config, callbacks) -> TrainResult`` (``trainer``), what a config
names built into objects (``assembly``), batches on the device (``batches``), one step over the
global batch (``global_batch``) and the processes of a data-parallel run (``distributed``,
``helper``). Nothing here knows Optuna, SLURM or executors."""

from clipse.training.trainer import (
    PAUSE,
    Callback,
    EpochReport,
    build_embedded_model,
    finish_paused,
    train,
)

__all__ = ["PAUSE", "Callback", "EpochReport", "build_embedded_model", "finish_paused", "train"]
