"""The local backend: ``workers`` long-lived processes on this machine (spawned, so each
imports torch once), each running one task at a time. A worker that dies marks its task lost
and is replaced.

Tasks that use GPUs get disjoint ones: each worker sees its own through ``CUDA_VISIBLE_DEVICES``
(a task's G GPUs, G = its ``--nproc`` on CUDA), or with ``--trials-per-gpu K`` K workers share
one GPU. Asking for more GPUs than are visible is an error before anything starts.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_ready

from clipse.executors.base import (
    CANCELLED,
    DONE,
    FAILED,
    LOST,
    RUNNING,
    Executor,
    Task,
    register_backend,
)
from clipse.util.errors import UserError
from clipse.util.fields import check_at_least, setting

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (else by index)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip() and name.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def gpu_sets(visible: list[str], workers: int, gpus_per_task: int, trials_per_gpu: int = 1) -> list[str] | None:
    """Each worker's ``CUDA_VISIBLE_DEVICES``: ``gpus_per_task`` GPUs of its own, or with
    ``trials_per_gpu`` K, one GPU shared by K workers. None when the tasks use no GPU."""
    if gpus_per_task == 0:
        return None
    if trials_per_gpu > 1 and gpus_per_task > 1:
        raise UserError(f"--trials-per-gpu {trials_per_gpu} shares a GPU between single-process trials; a trial "
                        f"here uses {gpus_per_task} GPUs (--nproc)")
    groups = -(-workers // trials_per_gpu)  # workers sharing a GPU form one group
    needed = groups * gpus_per_task
    if needed > len(visible):
        sharing = f" at {trials_per_gpu} trials per GPU" if trials_per_gpu > 1 else ""
        raise UserError(f"--workers {workers} with {gpus_per_task} GPU(s) per trial{sharing} needs {needed} GPUs; "
                        f"{len(visible)} visible ({','.join(visible) or 'none'})")
    return [",".join(visible[(slot // trials_per_gpu) * gpus_per_task:(slot // trials_per_gpu + 1) * gpus_per_task])
            for slot in range(workers)]


def _local_worker(connection, gpus: str | None) -> None:
    """Loop: receive (fn, args, threads), run, send the outcome back. Ctrl-C ends the worker."""
    if gpus is not None:  # before torch touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    import torch

    from clipse.util.errors import configure_logging

    configure_logging()
    try:
        while True:
            item = connection.recv()
            if item is None:
                return
            fn, args, threads = item
            torch.set_num_threads(threads)
            try:
                outcome = (DONE, fn(*args))
            except KeyboardInterrupt:
                connection.send((CANCELLED, "interrupted"))
                return
            except Exception as exc:
                outcome = (FAILED, exc)
            try:
                connection.send(outcome)
            except OSError:
                raise  # the coordinator is gone
            except Exception as exc:  # an outcome that does not pickle travels as text
                failure = outcome[1] if outcome[0] == FAILED else exc
                connection.send((FAILED, f"{type(failure).__name__}: {failure}"))
    except (KeyboardInterrupt, EOFError, OSError):
        return  # Ctrl-C, or the coordinator is gone (killed): the trial was told to the study already


@dataclass
class LocalOptions:
    """Local workers (--executor local)"""

    trials_per_gpu: int = setting(1, "single-process tasks that share one GPU (small models); each worker otherwise "
                                     "gets GPUs of its own")


@register_backend
class LocalExecutor(Executor):
    name = "local"
    options_class = LocalOptions

    def __init__(self, workers: int, gpus: list[str] | None = None):
        self.capacity = 10**9  # tasks queue here and start as workers free up
        self._context = multiprocessing.get_context("spawn")
        self._size = workers
        self._gpus = gpus  # each slot's CUDA_VISIBLE_DEVICES
        self._workers: dict[int, tuple] = {}     # slot -> (process, connection, task or None)
        self._queue: list[Task] = []

    @classmethod
    def from_options(cls, options, folder, job_name):
        own = cls.own_options(options)
        check_at_least(own, 1, "trials_per_gpu")
        gpus = options.resources.gpus and gpu_sets(visible_gpus(), options.workers, options.resources.gpus,
                                                   own.trials_per_gpu)
        return cls(options.workers, gpus or None)

    def _threads(self, task: Task) -> int:
        """The task's CPUs, or an even share of this machine's."""
        return task.resources.cpus or max(1, (os.cpu_count() or 1) // self._size)

    def _spawn(self, slot: int) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_local_worker, args=(child, self._gpus and self._gpus[slot]), daemon=True,
                                        name=f"clipse-worker-{slot}")
        process.start()
        child.close()
        self._workers[slot] = (process, parent, None)

    def submit(self, tasks):
        self._queue.extend(tasks)
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in range(self._size):
            if not self._queue:
                return
            if slot in self._workers and not self._workers[slot][0].is_alive():
                self._worker_died(slot)  # before its slot is reused: its task must not be forgotten
            if slot not in self._workers:
                self._spawn(slot)
            process, connection, current = self._workers[slot]
            if current is None:
                task = self._queue.pop(0)
                task.state, task.info = RUNNING, {"pid": process.pid}
                connection.send((task.fn, task.args, self._threads(task)))
                self._workers[slot] = (process, connection, task)

    def _worker_died(self, slot: int) -> None:
        """The slot's worker is gone: the task it held (if any) is lost; the slot is free."""
        process, _, task = self._workers.pop(slot)
        process.join(timeout=5)
        if task is not None:
            task.state, task.error = LOST, f"worker process {process.pid} died (exit code {process.exitcode})"
            log.warning("%s", task.error)

    def wait(self, tasks, timeout):
        self._dispatch()
        busy = {slot: w for slot, w in self._workers.items() if w[2] is not None}
        if not busy:
            time.sleep(min(timeout, 0.2))
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
                self._worker_died(slot)
                continue
            except Exception as exc:  # the outcome arrived but cannot be unpickled here
                task.state, task.error = FAILED, f"{type(exc).__name__} reading the result: {exc}"
                self._workers[slot] = (process, connection, None)
                continue
            task.state = state
            if state == CANCELLED:  # the worker was interrupted and exits: the slot gets a new one
                process.join(timeout=5)
                del self._workers[slot]
                task.error = str(payload)
                continue
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
