"""Executors run tasks (a picklable function and its arguments): in this process, in local
worker processes, or as SLURM jobs through submitit. The search and the final report hand
them work; they report each task's state, and a worker that dies leaves its task ``lost``
(never silently pending).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_ready
from pathlib import Path
from typing import Any, Callable

from clipse.errors import UserError

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED, LOST, CANCELLED = "pending", "running", "done", "failed", "lost", "cancelled"
FINAL_STATES = {DONE, FAILED, LOST, CANCELLED}


class Task:
    """One unit of work and what became of it."""

    def __init__(self, fn: Callable, args: tuple, label: str = ""):
        self.fn, self.args, self.label = fn, args, label
        self.state = PENDING
        self.result: Any = None
        self.error: str | None = None
        self.user_error = False          # the task failed on something the user must fix
        self.info: dict[str, Any] = {}   # pid, SLURM job id, log paths

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def fail(self, exc: BaseException) -> None:
        self.state = FAILED
        self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc)
        self.user_error = isinstance(exc, UserError)

    def __repr__(self) -> str:
        return f"Task({self.label or self.fn.__name__}, {self.state})"


class Executor:
    """``capacity``: how many tasks may be outstanding at once (more are queued by the caller)."""

    name = "base"
    capacity = 1

    def submit(self, fn: Callable, args_list: list[tuple], labels: list[str] | None = None) -> list[Task]:
        raise NotImplementedError

    def wait(self, tasks: list[Task], timeout: float) -> None:
        """Refresh the tasks' states, blocking up to ``timeout`` seconds for one to change."""

    def cancel(self, tasks: list[Task]) -> bool:
        """Stop unfinished tasks (running work gets Ctrl-C / scancel) and mark them; False when
        the work was left running on purpose (SLURM ``--detach``)."""
        return True

    def dead_jobs(self) -> set[str]:
        """SLURM job ids known to have ended (lets the lost-trial sweep act without waiting)."""
        return set()

    def close(self) -> None:
        pass


class InlineExecutor(Executor):
    """Runs each task in this process when it is submitted (one at a time)."""

    name = "inline"
    capacity = 1

    def submit(self, fn, args_list, labels=None):
        tasks = [Task(fn, args, (labels or [""] * len(args_list))[i]) for i, args in enumerate(args_list)]
        for task in tasks:
            task.state, task.info = RUNNING, {"pid": os.getpid()}
            try:
                task.result, task.state = task.fn(*task.args), DONE
            except Exception as exc:  # KeyboardInterrupt propagates to the caller
                task.fail(exc)
        return tasks


# ----------------------------------------------------------------------------------------------
# local worker processes


def _local_worker(connection, threads: int) -> None:
    """Loop: receive (fn, args), run, send the outcome back. Ctrl-C ends the worker."""
    from clipse.errors import configure_logging

    configure_logging()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        while True:
            item = connection.recv()
            if item is None:
                return
            fn, args = item
            try:
                connection.send((DONE, fn(*args)))
            except KeyboardInterrupt:
                connection.send((CANCELLED, "interrupted"))
                return
            except Exception as exc:
                try:
                    connection.send((FAILED, exc))
                except Exception:  # an exception that does not pickle travels as text
                    connection.send((FAILED, f"{type(exc).__name__}: {exc}"))
    except (KeyboardInterrupt, EOFError):
        return


class LocalExecutor(Executor):
    """``workers`` long-lived processes (spawned, so each imports torch once), each running
    one task at a time. A worker that dies marks its task lost and is replaced."""

    name = "local"

    def __init__(self, workers: int, threads_per_worker: int | None = None):
        if workers < 1:
            raise UserError("--workers must be at least 1")
        self.capacity = 10**9  # tasks queue here and start as workers free up
        self._context = multiprocessing.get_context("spawn")
        self._size = workers
        self._threads = threads_per_worker if threads_per_worker is not None else max(1, (os.cpu_count() or 1) // workers)
        self._workers: dict[int, tuple] = {}     # slot -> (process, connection, task or None)
        self._queue: list[Task] = []

    def _spawn(self, slot: int) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_local_worker, args=(child, self._threads), daemon=True,
                                        name=f"clipse-worker-{slot}")
        process.start()
        child.close()
        self._workers[slot] = (process, parent, None)

    def submit(self, fn, args_list, labels=None):
        tasks = [Task(fn, args, (labels or [""] * len(args_list))[i]) for i, args in enumerate(args_list)]
        self._queue.extend(tasks)
        self._dispatch()
        return tasks

    def _dispatch(self) -> None:
        for slot in range(self._size):
            if not self._queue:
                return
            if slot not in self._workers:
                self._spawn(slot)
            process, connection, current = self._workers[slot]
            if current is None:
                task = self._queue.pop(0)
                task.state, task.info = RUNNING, {"pid": process.pid}
                connection.send((task.fn, task.args))
                self._workers[slot] = (process, connection, task)

    def wait(self, tasks, timeout):
        self._dispatch()
        busy = {slot: w for slot, w in self._workers.items() if w[2] is not None}
        if not busy:
            time.sleep(min(timeout, 0.2) if self._queue else 0)
            return
        handles = {}
        for slot, (process, connection, _) in busy.items():
            handles[connection] = slot
            handles[process.sentinel] = slot
        for ready in wait_for_ready(list(handles), timeout):
            slot = handles[ready]
            if slot not in self._workers or self._workers[slot][2] is None:
                continue
            process, connection, task = self._workers[slot]
            try:
                state, payload = connection.recv()
            except (EOFError, OSError):
                process.join(timeout=5)
                task.state, task.error = LOST, f"worker process {process.pid} died (exit code {process.exitcode})"
                log.warning("%s", task.error)
                del self._workers[slot]
                continue
            task.state = state
            if state == DONE:
                task.result = payload
            elif isinstance(payload, BaseException):
                task.fail(payload)
            else:
                task.error = str(payload)
            self._workers[slot] = (process, connection, None)
        self._dispatch()

    def cancel(self, tasks):
        for task in self._queue:
            task.state = CANCELLED
        self._queue.clear()
        for process, connection, task in self._workers.values():
            if task is not None and process.is_alive():
                os.kill(process.pid, signal.SIGINT)  # the task fails its trial as retryable
        deadline = time.time() + 30
        for process, _, task in self._workers.values():
            process.join(timeout=max(0.1, deadline - time.time()))
            if process.is_alive():
                process.kill()
                process.join()
            if task is not None and not task.finished:
                task.state = CANCELLED
        self._workers.clear()
        return True

    def close(self):
        for process, connection, _ in self._workers.values():
            try:
                connection.send(None)
            except OSError:
                pass
        for process, _, _ in self._workers.values():
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        self._workers.clear()


# ----------------------------------------------------------------------------------------------
# SLURM through submitit


@dataclass
class SlurmOptions:
    """What each SLURM job asks for (flags ``--slurm-*``, shared by search and final)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float = 8.0
    time_min: int = 60
    extra: dict[str, str] = field(default_factory=dict)   # more sbatch parameters
    setup: list[str] = field(default_factory=list)        # shell lines before the job's python
    python: str | None = None                             # interpreter on the nodes
    poll_s: float = 10.0                                  # seconds between sacct state checks
    detach: bool = False                                  # Ctrl-C leaves jobs running


def add_executor_arguments(parser, unit: str) -> None:
    """--executor, --workers and the SLURM options; ``unit`` names what one task is."""
    parser.add_argument("--executor", choices=("inline", "local", "slurm"),
                        help=f"inline: in this process; local: --workers processes; slurm: one SLURM job per {unit} "
                             "(default: local if --workers > 1, else inline)")
    parser.add_argument("--workers", type=int, default=1, help=f"{unit}s running at once")
    group = parser.add_argument_group("SLURM executor (--executor slurm)")
    group.add_argument("--slurm-partition")
    group.add_argument("--slurm-account")
    group.add_argument("--slurm-qos")
    group.add_argument("--slurm-constraint")
    group.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per job (default 0)")
    group.add_argument("--cpus-per-task", type=int, default=2, help="CPUs per job (default 2)")
    group.add_argument("--mem-gb", type=float, default=8.0, help="memory per job in GB (default 8)")
    group.add_argument("--time-min", type=int, default=60, help="time limit per job in minutes (default 60)")
    group.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch parameter, e.g. --slurm-extra exclude=node07 (repeatable)")
    group.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                       help="shell line run before each job, e.g. 'module load cuda' (repeatable)")
    group.add_argument("--slurm-python", help="python on the nodes (default: this interpreter)")
    group.add_argument("--slurm-poll", type=float, default=10.0, help="seconds between job state checks")
    group.add_argument("--detach", action="store_true",
                       help="on Ctrl-C leave the jobs running instead of cancelling them")


def slurm_options_from_args(args) -> SlurmOptions:
    extra = {}
    for item in args.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--slurm-extra {item!r}: expected KEY=VALUE")
        extra[key.strip().replace("-", "_")] = value
    return SlurmOptions(partition=args.slurm_partition, account=args.slurm_account, qos=args.slurm_qos,
                        constraint=args.slurm_constraint, gpus_per_node=args.gpus_per_node,
                        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time_min,
                        extra=extra, setup=list(args.slurm_setup), python=args.slurm_python,
                        poll_s=args.slurm_poll, detach=args.detach)


class _Resubmittable:
    """The callable a SLURM job runs. On preemption or timeout (SIGUSR2) submitit calls
    ``checkpoint`` and requeues the job with the same arguments; the trial then resumes from
    its last epoch checkpoint (the job adopts the trial it was running)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def checkpoint(self, *args):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


FINAL_SLURM_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                      "DEADLINE"}


class SlurmExecutor(Executor):
    """Each task is a SLURM job; a batch of tasks is one job array with ``parallelism`` running
    at once. Job folders (scripts, logs, results) live under ``folder``, which must be on a
    filesystem the nodes see."""

    name = "slurm"

    def __init__(self, folder: Path, options: SlurmOptions, parallelism: int, job_name: str = "clipse"):
        import submitit

        self.capacity = 10**9
        self.options = options
        self._jobs: dict[int, Any] = {}       # id(task) -> submitit job
        self._last_poll = 0.0
        self._dead: set[str] = set()
        folder.mkdir(parents=True, exist_ok=True)
        self._executor = submitit.SlurmExecutor(folder=str(folder / "%j"), python=options.python)
        params = dict(job_name=job_name, time=options.time_min, cpus_per_task=options.cpus_per_task,
                      mem=f"{int(options.mem_gb * 1024)}M", array_parallelism=max(1, parallelism),
                      setup=options.setup, additional_parameters=dict(options.extra))
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(options, key):
                params[key] = getattr(options, key)
        if options.gpus_per_node:
            params["gpus_per_node"] = options.gpus_per_node
        self._executor.update_parameters(**params)

    def submit(self, fn, args_list, labels=None):
        import submitit

        tasks = [Task(fn, args, (labels or [""] * len(args_list))[i]) for i, args in enumerate(args_list)]
        if not tasks:
            return tasks
        try:
            jobs = self._executor.map_array(_Resubmittable(fn), *zip(*[t.args for t in tasks]))
        except (submitit.core.utils.FailedJobError, OSError, subprocess.CalledProcessError) as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else repr(exc))
            raise UserError(f"SLURM refused the submission: {reason.strip()}") from None
        for task, job in zip(tasks, jobs):
            task.state = RUNNING
            task.info = {"slurm_job": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
            self._jobs[id(task)] = job
        log.info("submitted %d SLURM job(s): array %s", len(jobs), jobs[0].job_id.split("_")[0])
        return tasks

    def wait(self, tasks, timeout):
        if not tasks:
            return
        deadline = time.time() + timeout
        while True:
            if time.time() - self._last_poll >= self.options.poll_s:
                self._jobs[id(tasks[0])].watcher.update()  # one sacct call for every job (shared watcher)
                self._last_poll = time.time()
            changed = False
            for task in tasks:
                if not task.finished and self._refresh(task):
                    changed = True
            if changed or time.time() >= deadline:
                return
            time.sleep(min(1.0, max(0.05, deadline - time.time())))

    def _refresh(self, task: Task) -> bool:
        job = self._jobs[id(task)]
        state = job.watcher.get_state(job.job_id, mode="cache").split(" ")[0].upper()
        if not job.paths.result_pickle.exists() and state not in FINAL_SLURM_STATES:
            return False
        try:
            task.result, task.state = job.result(), DONE
        except Exception as exc:  # the job raised (its traceback is in the message) or left no result
            text = str(exc).strip().splitlines()
            user_line = next((line for line in reversed(text) if "UserError:" in line), None)
            if user_line:
                task.state, task.user_error = FAILED, True
                task.error = user_line.split("UserError:", 1)[1].strip()
            else:
                task.state = LOST if not job.paths.result_pickle.exists() else FAILED
                task.error = f"SLURM job {job.job_id} ({state}): {text[-1] if text else type(exc).__name__}"
            self._dead.add(job.job_id)
        return True

    def cancel(self, tasks):
        if self.options.detach:
            return False
        for task in tasks:
            job = self._jobs.get(id(task))
            if job is not None and not task.finished:
                job.cancel(check=False)
                task.state = CANCELLED
                self._dead.add(job.job_id)
        return True

    def dead_jobs(self) -> set[str]:
        return set(self._dead)


def executor_from_args(args, slurm_folder: Path, job_name: str = "clipse") -> Executor:
    kind = args.executor or ("local" if args.workers > 1 else "inline")
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if kind == "inline":
        if args.workers > 1:
            raise UserError("--executor inline runs one at a time; use --executor local for --workers > 1")
        return InlineExecutor()
    if kind == "local":
        return LocalExecutor(args.workers)
    return SlurmExecutor(slurm_folder, slurm_options_from_args(args), args.workers, job_name=job_name)
