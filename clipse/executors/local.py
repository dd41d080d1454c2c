"""The local backend: ``workers`` long-lived processes on this machine (spawned, so each
imports torch once), each running one task at a time. A worker that dies marks its task lost
and is replaced."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait as wait_for_ready

from clipse.executors.base import CANCELLED, DONE, FAILED, LOST, RUNNING, Executor, Task, register_backend

log = logging.getLogger(__name__)


def _local_worker(connection) -> None:
    """Loop: receive (fn, args, threads), run, send the outcome back. Ctrl-C ends the worker."""
    import torch

    from clipse.errors import configure_logging

    configure_logging()
    try:
        while True:
            item = connection.recv()
            if item is None:
                return
            fn, args, threads = item
            torch.set_num_threads(threads)
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


@register_backend
class LocalExecutor(Executor):
    name = "local"

    def __init__(self, workers: int):
        self.capacity = 10**9  # tasks queue here and start as workers free up
        self._context = multiprocessing.get_context("spawn")
        self._size = workers
        self._workers: dict[int, tuple] = {}     # slot -> (process, connection, task or None)
        self._queue: list[Task] = []

    @classmethod
    def from_options(cls, options, folder, job_name):
        return cls(options.workers)

    def _threads(self, task: Task) -> int:
        """The task's CPUs, or an even share of this machine's."""
        return task.resources.cpus or max(1, (os.cpu_count() or 1) // self._size)

    def _spawn(self, slot: int) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_local_worker, args=(child,), daemon=True,
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
            if slot not in self._workers or not self._workers[slot][0].is_alive():
                self._spawn(slot)
            process, connection, current = self._workers[slot]
            if current is None:
                task = self._queue.pop(0)
                task.state, task.info = RUNNING, {"pid": process.pid}
                connection.send((task.fn, task.args, self._threads(task)))
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
