"""``run_registry.csv``: one row per finished run, appended safely by concurrent processes."""

from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import open_clip
import torch

from clipse import __version__
from clipse.config import TrainConfig
from clipse.evaluation.metrics import METRIC_KEYS
from clipse.runs.folder import RESUME_FREE_KEYS, TrainResult, append_whole
from clipse.util.locks import exclusive_lock
from clipse.util.paths import PROJECT_ROOT

REGISTRY_COLUMNS = (
    ["run_id", "study", "trial", "status", "loss", "params", "epochs_done", "best_epoch"]
    + [f"{split}_{k}" for split in ("val", "test") for k in (*METRIC_KEYS, "tie_share")]
    + ["duration_s", "host", "versions", "git_commit", "run_dir", "finished_at"]
)
OUTCOME_KEYS = ("run_id", "run_dir", "status", "epochs_done")  # one row per outcome of a run


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def versions() -> str:
    return json.dumps({"clipse": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                       "python": platform.python_version()})


def host() -> str:
    return platform.node()


def append_row(path: Path, row: dict) -> None:
    """Append one row, whole or not at all, under an exclusive lock (``clipse.util.locks``), unless the
    registry already holds this run's row for this outcome (same run, status and epochs: a
    crash between ``result.json`` and its row is repaired by resuming, without a duplicate). The
    header is written by whoever finds the file empty; a registry written by another clipse
    version keeps its own columns."""
    outcome = [str(row.get(key, "")) for key in OUTCOME_KEYS]
    with exclusive_lock(path), open(path, "a+b", buffering=0) as handle:
        handle.seek(0)
        text = handle.read().decode()
        lines = csv.reader(io.StringIO(text))
        columns = next(lines, None) or list(REGISTRY_COLUMNS)
        if all(key in columns for key in OUTCOME_KEYS):
            at = [columns.index(key) for key in OUTCOME_KEYS]
            if any(len(line) == len(columns) and [line[i] for i in at] == outcome for line in lines):
                return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        if not text.strip():
            writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        append_whole(handle.fileno(), buffer.getvalue(), path)


def registry_row(config: TrainConfig, result: TrainResult) -> dict:
    params = {k: v for k, v in config.to_mapping().items() if k not in RESUME_FREE_KEYS}
    return {
        "run_id": result.run_id, "study": config.study, "trial": config.trial, "status": result.status,
        "loss": config.loss, "params": json.dumps(params, sort_keys=True), "epochs_done": result.epochs_done,
        "best_epoch": result.best_epoch, **result.best_metrics, **(result.test_metrics or {}),
        "duration_s": round(result.seconds, 2), "host": host(), "versions": versions(),
        "git_commit": git_commit(), "run_dir": result.run_dir,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
