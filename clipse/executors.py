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
import time
from multiprocessing.connection import wait as wait_for_ready
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

    def cancel(self, tasks: list[Task]) -> None:
        """Stop unfinished tasks (running work gets Ctrl-C / scancel) and mark them."""

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
