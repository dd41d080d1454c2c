"""Runs planned ahead and trained by an executor: the final report's runs and a search's
confirmation runs. Finished runs are reused, interrupted ones resume from their checkpoints,
and a run whose worker died is retried (``--max-retries``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clipse.config import TrainConfig
from clipse.executors import (
    DONE,
    LOST,
    ExecutorOptions,
    Task,
    executor_from_options,
    for_training,
)
from clipse.executors.workload import Workload, run_workload
from clipse.runs.folder import RunFolder
from clipse.search.progress import format_duration
from clipse.training.trainer import train
from clipse.util.errors import UserError


@dataclass
class PlannedRun:
    label: str
    seed: int
    config: TrainConfig

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.config.run_dir)

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


def run_planned_task(config_mapping: dict) -> dict:
    """What an executor runs: one training run (resumed if it was interrupted)."""
    result = train(TrainConfig.from_mapping(config_mapping, "planned run"))
    return dataclasses.asdict(result)


def finished(run: PlannedRun, diverged_counts: bool = False) -> bool:
    """A run that completed (with test results where it evaluates the test split), or diverged
    when that ``diverged_counts``, with exactly this configuration."""
    result = run.folder.result()
    if result is None:
        return False
    changed = run.folder.config_differences(run.config)
    if changed:
        raise UserError(f"{run.folder.path} was trained with other settings ({'; '.join(changed)}); delete it or "
                        "keep the earlier settings")
    if diverged_counts and result.status == "diverged":
        return True
    return result.status == "completed" and (bool(result.test_metrics) or not run.config.eval_test)


class RunWorkload(Workload):
    """Train every planned run; a run whose worker died is retried from its checkpoint."""

    def __init__(self, runs: list[PlannedRun], execution: ExecutorOptions, label: str):
        self.queue, self.execution, self.label = list(runs), execution, label
        self.planned = {r.name: r for r in runs}
        self.total, self.done, self.started = len(runs), 0, time.time()
        self.attempts: dict[str, int] = {}
        self.problems: list[str] = []   # failed or lost: a re-run retries them
        self.diverged: list[str] = []   # a re-run would diverge again

    def wanted(self, room: int, outstanding: int) -> list[Task]:
        batch, self.queue = self.queue[:room], self.queue[room:]
        for run in batch:
            self.attempts[run.name] = self.attempts.get(run.name, 0) + 1
        return [Task(run_planned_task, (r.config.to_mapping(),), r.name, self.execution.resources) for r in batch]

    def finished(self, task: Task) -> None:
        if task.state == LOST and self.attempts[task.label] <= self.execution.max_retries:
            print(f"[{self.label}] {task.label}: {task.error}; retrying from its checkpoint", file=sys.stderr)
            self.queue.append(self.planned[task.label])
            return
        self.done += 1
        eta = (time.time() - self.started) / self.done * (self.total - self.done)
        status = task.result["status"] if task.state == DONE else f"{task.state}: {task.error}"
        print(f"[{self.label}] {self.done}/{self.total} runs done ({task.label}: {status}) | "
              f"{format_duration(time.time() - self.started)} elapsed | ETA {format_duration(eta)}", file=sys.stderr)
        if task.state == DONE and task.result["status"] == "diverged":
            self.diverged.append(task.label)
        elif task.state != DONE or task.result["status"] != "completed":
            self.problems.append(f"{task.label} ({status})")

    def complete(self) -> bool:
        return not self.queue


def train_planned(runs: list[PlannedRun], execution: ExecutorOptions, slurm_folder: Path, job_name: str,
                  label: str, runs_folder: Path, diverged_counts: bool = False) -> bool:
    """Train the runs not finished yet, with progress on stderr; False when interrupted (Ctrl-C).
    A run that did not complete is one line (a re-run retries it); so is a diverged one, unless
    ``diverged_counts`` (then it is finished: a re-run would diverge again)."""
    todo = [r for r in runs if not finished(r, diverged_counts)]
    print(f"[{label}] {len(runs) - len(todo)} of {len(runs)} runs already finished; training {len(todo)}",
          file=sys.stderr)
    if not todo:
        return True
    execution = for_training(execution, todo[0].config)  # the runs share one study's base settings
    executor = executor_from_options(execution, slurm_folder, job_name=job_name)
    workload = RunWorkload(todo, execution, label)
    if run_workload(executor, workload).interrupted:
        return False
    if workload.diverged and not diverged_counts:
        raise UserError(f"runs diverged (a non-finite loss): {', '.join(workload.diverged)}; those settings do not "
                        "train with those seeds, and a re-run would diverge again")
    if workload.problems:
        raise UserError(f"some runs did not complete: {', '.join(workload.problems)}; their folders are under "
                        f"{runs_folder}; re-run the same command to retry them")
    return True
