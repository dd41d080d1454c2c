"""The one loop that hands work to an executor: submit what is wanted, wait, look at what
finished, let the work sweep and retry, and on Ctrl-C or an error stop what is running. Both
``clipse.search`` (a task takes one trial of a study) and ``clipse.final`` (a task is one
training run) drive their executor through it; what differs lives in their ``Workload``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from clipse.executors import Executor, Task

POLL_S = 2.0


class Workload(ABC):
    """What the loop asks of the work it drives."""

    def sweep(self, executor: Executor) -> None:
        """Called every round before new work is asked for (find lost work, queue retries)."""

    @abstractmethod
    def wanted(self, room: int, outstanding: int) -> list[Task]:
        """New tasks to submit now: at most ``room``, with ``outstanding`` already out."""

    @abstractmethod
    def finished(self, task: Task) -> None:
        """A task ended (any final state): report it, count it, retry it or raise."""

    @abstractmethod
    def complete(self) -> bool:
        """All work is done (asked when no task is outstanding)."""

    def stopped(self, stopped: bool) -> None:
        """After a cancel: ``stopped`` is False when the executor left its work running."""


@dataclass
class LoopEnd:
    interrupted: bool = False   # Ctrl-C
    detached: bool = False      # the interrupted work was left running (SLURM --detach)


def run_workload(executor: Executor, workload: Workload, poll_s: float = POLL_S) -> LoopEnd:
    """Drive ``workload`` to completion on ``executor``. Ctrl-C cancels the outstanding tasks
    and returns; any other exception cancels them and propagates. The executor is closed."""
    tasks: list[Task] = []
    seen: set[Task] = set()
    try:
        while True:
            workload.sweep(executor)
            outstanding = [t for t in tasks if not t.finished]
            room = executor.capacity - len(outstanding)
            new = workload.wanted(room, len(outstanding)) if room > 0 else []
            if new:
                tasks += new
                executor.submit(new)
            for task in tasks:
                if task.finished and task not in seen:
                    seen.add(task)
                    workload.finished(task)
            outstanding = [t for t in tasks if not t.finished]
            if not outstanding and not new and workload.complete():
                return LoopEnd()
            if outstanding:
                executor.wait(outstanding, poll_s)
            elif not new:
                time.sleep(poll_s)  # nothing of ours runs: watch (other sessions' work, a queue that waits)
    except KeyboardInterrupt:
        stopped = _cancel(executor, workload, tasks)
        return LoopEnd(interrupted=True, detached=not stopped)
    except BaseException:
        _cancel(executor, workload, tasks)  # leave no job or trial behind
        raise
    finally:
        executor.close()


@contextlib.contextmanager
def _ignoring_interrupts():
    """A second Ctrl-C or SIGTERM must not interrupt the clean-up (only the main thread handles
    signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _cancel(executor: Executor, workload: Workload, tasks: list[Task]) -> bool:
    with _ignoring_interrupts():
        stopped = executor.cancel([t for t in tasks if not t.finished])
        workload.stopped(stopped)
        return stopped
