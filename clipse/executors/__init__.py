"""Executors run tasks: in this process (``inline``), in local worker processes (``local``), or
as SLURM jobs through submitit (``slurm``). The search and the final report hand them work
through one loop (``clipse.workload``); each backend is one module of this package, found here
by importing them all (see ``clipse.executors.base`` for the interface).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from clipse.errors import UserError
from clipse.executors.base import (BACKENDS, CANCELLED, DONE, FAILED, LOST, PENDING, RUNNING, Executor, Resources,
                                   Task, WorkerEnvironment, backend_names, register_backend, register_environment,
                                   worker_environment)
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
    resources: Resources = setting(default_factory=Resources, nested=True)
    slurm: SlurmOptions = setting(default_factory=SlurmOptions, nested=True)

    @property
    def backend(self) -> str:
        return self.executor or ("local" if self.workers > 1 else "inline")


def executor_from_options(options: ExecutorOptions, folder: Path, job_name: str = "clipse") -> Executor:
    """The executor the options name; ``folder`` holds its files (SLURM job folders)."""
    check_at_least(options, 1, "workers")
    check_at_least(options, 0, "max_retries")
    if options.backend not in BACKENDS:
        raise UserError(f"unknown executor '{options.backend}' (choose from {', '.join(backend_names())})")
    return BACKENDS[options.backend].from_options(options, folder, job_name)


__all__ = ["BACKENDS", "CANCELLED", "DONE", "FAILED", "LOST", "PENDING", "RUNNING", "Executor", "ExecutorOptions",
           "Resources", "SlurmOptions", "Task", "WorkerEnvironment", "backend_names", "executor_from_options",
           "register_backend", "register_environment", "worker_environment"]
