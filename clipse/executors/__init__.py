"""Executors run tasks: in this process (``inline``), in local worker processes (``local``), or
as SLURM jobs through submitit (``slurm``). The search and the final report hand them work
through one loop (``clipse.workload``); each backend is one module of this package, found here
by importing them all (see ``clipse.executors.base`` for the interface).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from clipse.errors import UserError
from clipse.executors.base import (BACKENDS, CANCELLED, DONE, FAILED, LOST, PENDING, RUNNING, Executor, Resources,
                                   Task, WorkerEnvironment, backend_names, register_backend, register_environment,
                                   task_resources, worker_environment)
from clipse.fields import check_at_least, setting

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from clipse.executors.slurm import SlurmOptions  # noqa: E402


@dataclass
class ExecutorOptions:
    """Execution: where tasks run (a task is a trial of a search, or a training run of a report)"""

    executor: str | None = setting(None, "inline: in this process; local: --workers processes on this machine; "
                                   "slurm: one SLURM job per task", choices=backend_names,
                                   shown_default="local if --workers > 1, else inline")
    workers: int = setting(1, "tasks running at once")
    max_retries: int = setting(2, "retries of a task whose worker died (a retry resumes from its checkpoint)")
    trials_per_gpu: int = setting(1, "local workers: single-process tasks that share one GPU (small models); each "
                                     "worker otherwise gets GPUs of its own")
    resources: Resources = setting(default_factory=Resources, nested=True)
    slurm: SlurmOptions = setting(default_factory=SlurmOptions, nested=True)

    @property
    def backend(self) -> str:
        return self.executor or ("local" if self.workers > 1 else "inline")


def for_training(options: ExecutorOptions, config) -> ExecutorOptions:
    """``options`` with each task's resources sized for runs of ``config`` (a TrainConfig):
    ``--nproc`` processes, and a GPU each when the run trains on CUDA."""
    from clipse.assembly import wants_cuda

    return dataclasses.replace(options, resources=task_resources(options.resources, config.nproc,
                                                                 wants_cuda(config.device)))


def executor_from_options(options: ExecutorOptions, folder: Path, job_name: str = "clipse") -> Executor:
    """The executor the options name; ``folder`` holds its files (SLURM job folders)."""
    check_at_least(options, 1, "workers")
    check_at_least(options, 0, "max_retries")
    check_at_least(options, 1, "trials_per_gpu")
    if options.backend not in BACKENDS:
        raise UserError(f"unknown executor '{options.backend}' (choose from {', '.join(backend_names())})")
    return BACKENDS[options.backend].from_options(options, folder, job_name)


__all__ = ["BACKENDS", "CANCELLED", "DONE", "FAILED", "LOST", "PENDING", "RUNNING", "Executor", "ExecutorOptions",
           "Resources", "SlurmOptions", "Task", "WorkerEnvironment", "backend_names", "executor_from_options",
           "for_training", "register_backend", "register_environment", "task_resources", "worker_environment"]
