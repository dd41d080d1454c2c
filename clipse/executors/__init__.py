"""Executors run tasks: in this process (``inline``), in local worker processes (``local``), or
as SLURM jobs through submitit (``slurm``). The search and the final report hand them work
through one loop (``clipse.executors.workload``); each backend is one module of this package, found here
by importing them all (see ``clipse.executors.base`` for the interface).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

from clipse.executors.base import (
    BACKENDS,
    CANCELLED,
    DONE,
    FAILED,
    LOST,
    PENDING,
    RUNNING,
    Executor,
    ExecutorOptions,
    Resources,
    Task,
    WorkerEnvironment,
    backend_names,
    register_backend,
    register_environment,
    task_resources,
    worker_environment,
)
from clipse.util.errors import UserError
from clipse.util.fields import check_at_least

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def for_training(options: ExecutorOptions, config) -> ExecutorOptions:
    """``options`` with each task's resources sized for runs of ``config`` (a TrainConfig):
    ``--nproc`` processes, and a GPU each when the run trains on CUDA."""
    from clipse.training.assembly import wants_cuda

    return dataclasses.replace(options, resources=task_resources(options.resources, config.nproc,
                                                                 wants_cuda(config.device)))


def executor_from_options(options: ExecutorOptions, folder: Path, job_name: str = "clipse") -> Executor:
    """The executor the options name; ``folder`` holds its files (SLURM job folders)."""
    check_at_least(options, 1, "workers")
    check_at_least(options, 0, "max_retries")
    if options.backend not in BACKENDS:
        raise UserError(f"unknown executor '{options.backend}' (choose from {', '.join(backend_names())})")
    return BACKENDS[options.backend].from_options(options, folder, job_name)


__all__ = ["BACKENDS", "CANCELLED", "DONE", "FAILED", "LOST", "PENDING", "RUNNING", "Executor", "ExecutorOptions",
           "Resources", "Task", "WorkerEnvironment", "backend_names", "executor_from_options",
           "for_training", "register_backend", "register_environment", "task_resources", "worker_environment"]
