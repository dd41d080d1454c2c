"""The run folder: its layout, the result of a run, safe writes and reads, and the resume checks.

One folder per run (``docs/reference/run-folder.md``)::

    config.yaml      the resolved settings
    training.csv     one row per logged step
    epochs.csv       one row per epoch
    last.pt          checkpoint after the latest epoch (model, optimizer, counters)
    best.pt          checkpoint of the best validation epoch
    result.json      the run's outcome (``TrainResult``), written when it ends
    test_ranks.npz   per-query test ranks (with ``eval_test``), for paired bootstraps
    dynamics.png     a small plot of the run, made for the search's artifacts

Every file but the appended CSVs is replaced atomically (temporary file flushed to disk, then
renamed), and the CSVs take whole rows or none, so a crash or a full disk leaves the previous
version. Checkpoints hold only tensors, numbers, strings, lists and dicts, and are read with
``torch.load(weights_only=True)``: a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clipse.config import TRACKING_KEYS, TrainConfig, config_yaml, load_config_file
from clipse.evaluation.metrics import RetrievalRanks
from clipse.util.checkpoints import read_checkpoint
from clipse.util.errors import UserError, storage_full_is_one_line
from clipse.util.paths import ADHOC_RUNS_DIR

# Settings that may change when a run is resumed: they do not change what is computed.
RESUME_FREE_KEYS = frozenset({"resume", "progress", "threads", "device", "registry", "run_dir", "study", "trial",
                              "eval_test", "log_every", "compile", "grad_checkpointing", "nproc", "micro_batch",
                              "zeroshot_every",
                              *TRACKING_KEYS})


@dataclass
class TrainResult:
    run_id: str
    run_dir: str
    status: str                              # completed | stopped | diverged | paused (never saved)
    epochs_done: int
    best_epoch: int
    best_value: float                        # of config.select_metric; -inf before any epoch
    best_metrics: dict[str, float]           # validation metrics of the best epoch
    last_metrics: dict[str, float]
    weight_stats: dict[str, float]           # last epoch's means
    test_metrics: dict[str, float] | None = None
    diverged_step: int | None = None
    seconds: float = 0.0
    start_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the starting model's zero-shot accuracy

    @property
    def finished(self) -> bool:
        """Nothing more to train: completed or diverged (a stopped run may be continued)."""
        return self.status in ("completed", "diverged")


# ----------------------------------------------------------------------------------------------
# safe file operations


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, flush it to disk, then rename it over ``path``.
    A write that fails (a full disk) removes the temporary file and leaves ``path`` as it was."""
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        with storage_full_is_one_line(path):
            write(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


class _WriteErrorWitness:
    """The file torch.save writes through, keeping what interrupted a write: torch turns any
    exception raised while it writes (a full disk, Ctrl-C) into a RuntimeError without the cause."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except BaseException as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(payload: dict, path: Path) -> None:
    with open(path, "wb") as handle:
        witness = _WriteErrorWitness(handle)
        try:
            torch.save(payload, witness)
        except RuntimeError:
            if witness.error is None:
                raise
            raise witness.error from None


def atomic_torch_save(payload: dict, path: Path) -> None:
    replace_atomically(path, lambda tmp: _torch_save(payload, tmp))


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def append_whole(fd: int, text: str, path: Path) -> None:
    """Append ``text`` to the file open (for appending) as ``fd``, all of it or none: a write
    that fails part-way (a full disk) is cut back off, so no half row is left behind."""
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        with storage_full_is_one_line(path):
            remaining = memoryview(text.encode())
            while remaining:
                remaining = remaining[os.write(fd, remaining):]
            os.fsync(fd)
    except BaseException:
        os.ftruncate(fd, end)
        raise


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows, whole or not at all; a file that exists keeps its own header (a run resumed
    by a newer clipse does not grow columns its header lacks)."""
    if not rows:
        return
    header = None
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as handle:
            header = next(csv.reader(handle))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header or list(rows[0]), extrasaction="ignore")
    if header is None:
        writer.writeheader()
    writer.writerows(rows)
    with open(path, "ab", buffering=0) as handle:
        append_whole(handle.fileno(), buffer.getvalue(), path)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def truncate_csv(path: Path, column: str, keep_up_to: int) -> None:
    """Drop rows written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = [row for row in reader if int(row[column]) <= keep_up_to]
    replace_atomically(path, lambda tmp: _write_csv(tmp, columns, rows))


# ----------------------------------------------------------------------------------------------


def default_run_dir() -> Path:
    return ADHOC_RUNS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class RunFolder:
    """The files of one run; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.yaml")
    training_csv = property(lambda self: self.path / "training.csv")
    epochs_csv = property(lambda self: self.path / "epochs.csv")
    last_checkpoint = property(lambda self: self.path / "last.pt")
    best_checkpoint = property(lambda self: self.path / "best.pt")
    result_file = property(lambda self: self.path / "result.json")
    test_ranks_file = property(lambda self: self.path / "test_ranks.npz")
    dynamics_png = property(lambda self: self.path / "dynamics.png")

    def run_id(self, study: str) -> str:
        return f"{study}/{self.path.name}" if study else self.path.name

    # -- settings and resuming ------------------------------------------------------------------
    def saved_config(self) -> TrainConfig | None:
        return load_config_file(self.config_file) if self.config_file.exists() else None

    def config_differences(self, config: TrainConfig) -> list[str]:
        """Settings that differ from the folder's saved config (ignoring the resume-free ones)."""
        saved = self.saved_config()
        if saved is None:
            return []
        before, now = saved.to_mapping(), config.to_mapping()
        return [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in now
                if k not in RESUME_FREE_KEYS and before.get(k) != now[k]]

    def start(self, config: TrainConfig) -> TrainResult | None:
        """Check that ``config`` may train here and write its ``config.yaml``. Returns the
        result of a run that already finished here (nothing to train), else None."""
        if not config.resume and (self.last_checkpoint.exists() or self.result_file.exists()):
            raise UserError(f"{self.path}: already holds a run; pass --resume to continue it or choose another "
                            "--run-dir")
        if config.resume:
            changed = self.config_differences(config)
            if changed:
                raise UserError(f"{self.path}: cannot resume with a different configuration ({'; '.join(changed)})")
            finished = self.result()
            if finished is not None and finished.finished:
                return finished
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, config_yaml(config))
        return None

    def rewind(self, epoch: int, step: int, pending: dict | None = None) -> tuple[list[dict], dict | None]:
        """Make the CSVs agree with the checkpoint a run resumes from (epoch, step): drop rows
        written after it, and write its own rows (``pending``, kept in the checkpoint) where a
        crash came between saving the checkpoint and appending them. Returns the rows it wrote
        (step rows, epoch row or None)."""
        truncate_csv(self.training_csv, "step", step)
        truncate_csv(self.epochs_csv, "epoch", epoch)
        if not pending:
            return [], None
        last_step = max((int(row["step"]) for row in read_csv(self.training_csv)), default=0)
        steps = [row for row in pending["steps"] if row["step"] > last_step]
        self.append_steps(steps)
        epoch_row = None
        if max((int(row["epoch"]) for row in self.epoch_rows()), default=0) < epoch:
            epoch_row = pending["epoch"]
            self.append_epoch(epoch_row)
        return steps, epoch_row

    # -- rows -----------------------------------------------------------------------------------
    def append_steps(self, rows: list[dict]) -> None:
        append_csv(self.training_csv, rows)

    def append_epoch(self, row: dict) -> None:
        append_csv(self.epochs_csv, [row])

    def epoch_rows(self) -> list[dict[str, str]]:
        return read_csv(self.epochs_csv)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_last(self, payload: dict) -> None:
        atomic_torch_save(payload, self.last_checkpoint)

    def save_best(self, payload: dict) -> None:
        atomic_torch_save(payload, self.best_checkpoint)

    def load_last(self, map_location) -> dict | None:
        return read_checkpoint(self.last_checkpoint, map_location) if self.last_checkpoint.exists() else None

    def load_best_weights(self, map_location) -> dict:
        return read_checkpoint(self.best_checkpoint, map_location)["state_dict"]

    # -- outcome --------------------------------------------------------------------------------
    def save_result(self, result: TrainResult) -> None:
        atomic_write_text(self.result_file, json.dumps(dataclasses.asdict(result), indent=2, allow_nan=True))

    def result(self) -> TrainResult | None:
        if not self.result_file.exists():
            return None
        return TrainResult(**json.loads(self.result_file.read_text()))

    def save_test_ranks(self, ranks: RetrievalRanks) -> None:
        replace_atomically(self.test_ranks_file, lambda tmp: np.savez(tmp, **ranks.to_arrays()))

    def test_ranks(self) -> RetrievalRanks:
        with np.load(self.test_ranks_file) as data:
            return RetrievalRanks.from_arrays({k: data[k] for k in data.files})
