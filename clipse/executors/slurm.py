"""The SLURM backend, through submitit: each task is a SLURM job; a batch of tasks with the
same resources is one job array with ``--workers`` running at once. Job folders (scripts,
logs, results) live under the given folder, which must be on a filesystem the nodes see.

A job knows itself from SLURM's variables (``SlurmEnvironment``); a requeued job keeps its job
id, so it can take back the trial it was running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable

from clipse.executors.base import (
    CANCELLED,
    DONE,
    FAILED,
    LOST,
    RUNNING,
    Executor,
    Resources,
    Task,
    WorkerEnvironment,
    register_backend,
    register_environment,
    running_in,
)
from clipse.util.errors import UserError
from clipse.util.fields import setting

log = logging.getLogger(__name__)

# The last line of a Python traceback: "ValueError: boom", "clipse.util.errors.UserError: ...".
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b[^:]*:")


@dataclass
class SlurmOptions:
    """SLURM executor (--executor slurm)"""

    partition: str | None = setting(None, "SLURM partition", flag="--slurm-partition")
    account: str | None = setting(None, "SLURM account", flag="--slurm-account")
    qos: str | None = setting(None, "SLURM quality of service", flag="--slurm-qos")
    constraint: str | None = setting(None, "SLURM node constraint", flag="--slurm-constraint")
    time_min: int = setting(60, "time limit per job in minutes")
    extra: dict[str, str] = setting(default_factory=dict, help="extra sbatch parameter, e.g. --slurm-extra "
                                    "exclude=node07 (repeatable)", flag="--slurm-extra")
    setup: list[str] = setting(default_factory=list, help="shell line run before each job, e.g. 'module load "
                               "cuda' (repeatable)", flag="--slurm-setup", metavar="LINE")
    python: str | None = setting(None, "python on the nodes (default: this interpreter)", flag="--slurm-python")
    poll_s: float = setting(10.0, "seconds between job state checks", flag="--slurm-poll")
    detach: bool = setting(False, "on Ctrl-C leave the jobs running instead of cancelling them")


@register_environment
class SlurmEnvironment(WorkerEnvironment):
    """A SLURM job (an array task, for arrays). Whether it ended is known to the executor that
    watches it, not from its identity."""

    kind = "slurm"

    def __init__(self):
        self.job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            self.job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "job": self.job}

    def was(self, identity: dict[str, Any]) -> bool:
        return bool(self.job) and identity.get("kind") == self.kind and identity.get("job") == self.job

    def public_attrs(self) -> dict[str, Any]:
        import submitit

        attrs = {"slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID")),
                 "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
                 "slurm_node": os.environ.get("SLURMD_NODENAME")}
        paths = submitit.JobEnvironment().paths
        attrs.update(slurm_stdout=str(paths.stdout), slurm_stderr=str(paths.stderr))
        return {k: v for k, v in attrs.items() if v is not None}


def _job_ranks():
    """A job of N tasks (a data-parallel trial): the session of its ranks, rank = task (the GPUs
    stay visible to every task; each takes the one of its local rank). The training imports
    (torch, open_clip) are paid here, in the job, not by every process that loads the backends."""
    import submitit

    from clipse.training.distributed import session_from_environment

    if submitit.JobEnvironment().num_tasks <= 1:
        return contextlib.nullcontext(None)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return session_from_environment()


class _Resubmittable:
    """The callable a SLURM job runs. On preemption or timeout (SIGUSR2) submitit calls
    ``checkpoint`` and requeues the job with the same arguments; the task then resumes (a
    trial is taken back by its job id and continues from its last epoch checkpoint)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        with running_in(SlurmEnvironment()), _job_ranks() as session:
            if session is not None and not session.ranks.main:  # a data-parallel run's other ranks
                from clipse.training.helper import serve

                serve(session.ranks)
                return None
            return self.fn(*args)

    def checkpoint(self, *args):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


@register_backend
class SlurmExecutor(Executor):
    name = "slurm"
    options_class = SlurmOptions
    multi_node = True
    heartbeat_grace_s = 600.0  # a requeued job waits minutes before it restarts
    default_cpus = 2

    def __init__(self, folder: Path, options: SlurmOptions, parallelism: int, job_name: str = "clipse"):
        import submitit

        self.capacity = 10**9
        self.options = options
        self._jobs: dict[Task, Any] = {}      # task -> submitit job
        self._last_poll = 0.0
        self._dead: set[str] = set()
        folder.mkdir(parents=True, exist_ok=True)
        self._executor = submitit.SlurmExecutor(folder=str(folder / "%j"), python=options.python)
        params = dict(job_name=job_name, time=options.time_min, array_parallelism=max(1, parallelism),
                      setup=options.setup,
                      additional_parameters={k.replace("-", "_"): v for k, v in options.extra.items()})
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(options, key):
                params[key] = getattr(options, key)
        self._executor.update_parameters(**params)

    @classmethod
    def from_options(cls, options, folder, job_name):
        return cls(folder, cls.own_options(options), options.workers, job_name=job_name)

    @staticmethod
    def _resource_parameters(resources: Resources) -> dict[str, Any]:
        params = {"cpus_per_task": resources.cpus or SlurmExecutor.default_cpus, "mem": f"{int(resources.mem_gb * 1024)}M",
                  "ntasks_per_node": resources.processes}
        if resources.gpus:
            params["gpus_per_node"] = resources.gpus
        return params

    def submit(self, tasks):
        import submitit

        for (fn, resources), group in groupby(tasks, key=lambda t: (t.fn, t.resources)):
            group = list(group)
            self._executor.update_parameters(**self._resource_parameters(resources))
            try:
                with self._executor.batch():  # one job array per group
                    jobs = [self._executor.submit(_Resubmittable(fn), *task.args) for task in group]
            except (submitit.core.utils.FailedJobError, OSError, subprocess.CalledProcessError) as exc:
                lines = [line for line in str(exc).splitlines() if line.strip()]
                reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else repr(exc))
                raise UserError(f"SLURM refused the submission: {reason.strip()}") from None
            for task, job in zip(group, jobs):
                task.state = RUNNING
                task.info = {"slurm_job": job.job_id, "stdout": str(job.paths.stdout),
                             "stderr": str(job.paths.stderr)}
                self._jobs[task] = job
            log.info("submitted %d SLURM job(s): array %s", len(jobs), jobs[0].job_id.split("_")[0])

    def wait(self, tasks, timeout):
        if not tasks:
            return
        deadline = time.time() + timeout
        while True:
            if time.time() - self._last_poll >= self.options.poll_s:
                self._jobs[tasks[0]].watcher.update()  # one sacct call for every job (shared watcher)
                self._last_poll = time.time()
            changed = False
            for task in tasks:
                if not task.finished and self._refresh(task):
                    changed = True
            if changed or time.time() >= deadline:
                return
            time.sleep(min(1.0, max(0.05, deadline - time.time())))

    def _refresh(self, task: Task) -> bool:
        job = self._jobs[task]
        # submitit's own notion of an ended job (a preempted job is requeued, so not ended)
        if not job.paths.result_pickle.exists() and not job.watcher.is_done(job.job_id, mode="cache"):
            return False
        state = job.watcher.get_state(job.job_id, mode="cache").split(" ")[0].upper()
        try:
            task.result, task.state = (job.task(0) if job.num_tasks > 1 else job).result(), DONE  # rank 0's
        except Exception as exc:  # the job raised (its traceback is in the message) or left no result
            text = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            raised = next((line for line in reversed(text) if EXCEPTION_LINE.match(line)), None)
            if raised and "UserError:" in raised:
                task.state, task.user_error = FAILED, True
                task.error = raised.split("UserError:", 1)[1].strip()
            elif job.paths.result_pickle.exists():
                task.state, task.error = FAILED, f"SLURM job {job.job_id}: {raised or text[-1]}"
            else:
                task.state = LOST
                task.error = f"SLURM job {job.job_id} ({state}) ended without a result: {raised or text[-1]}"
            self._dead.add(job.job_id)
        return True

    def cancel(self, tasks):
        if self.options.detach:
            return False
        for task in tasks:
            job = self._jobs.get(task)
            if job is not None and not task.finished:
                job.cancel(check=False)
                task.state = CANCELLED
                self._dead.add(job.job_id)
        return True

    def worker_gone(self, identity):
        if identity.get("kind") == SlurmEnvironment.kind and identity.get("job") in self._dead:
            return f"SLURM job {identity['job']} ended"
        return super().worker_gone(identity)
