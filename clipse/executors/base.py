"""The executor interface: tasks, their resource requests, the backends that run them, and the
environment a task runs in (who is running it, and whether that worker is gone).

A backend is one module of this package: an ``Executor`` subclass decorated with
``@register_backend`` (and, where its workers need their own identity, a ``WorkerEnvironment``
decorated with ``@register_environment``). Its own settings are a dataclass of flags named by
its ``options_class``: ``ExecutorOptions`` collects them from every registered backend, so
nothing outside the backend's module names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from clipse.util.errors import UserError
from clipse.util.fields import setting

PENDING, RUNNING, DONE, FAILED, LOST, CANCELLED = "pending", "running", "done", "failed", "lost", "cancelled"
FINAL_STATES = {DONE, FAILED, LOST, CANCELLED}


@dataclass(frozen=True)
class Resources:
    """Resources of each task (SLURM requests them; local workers size their CPU threads by them)"""

    cpus: int | None = setting(None, "CPUs per task", flag="--cpus-per-task", shown_default=lambda: "; ".join(
        f"{name} {backend.default_cpus or 'an even share of the machine'}" for name, backend in BACKENDS.items()))
    gpus: int = setting(0, "GPUs per task", flag="--gpus-per-node")
    mem_gb: float = setting(8.0, "memory per task in GB (SLURM)")
    processes: int = 1  # processes per task; a data-parallel run asks for more (task_resources)


def task_resources(resources: Resources, nproc: int, uses_gpus: bool) -> Resources:
    """The resources of a task that trains a run over ``nproc`` processes: as many processes,
    and on GPUs at least one GPU each."""
    return dataclasses.replace(resources, processes=nproc,
                               gpus=max(resources.gpus, nproc) if uses_gpus else resources.gpus)


class Task:
    """One unit of work (a picklable function and its arguments) and what became of it."""

    def __init__(self, fn: Callable, args: tuple, label: str = "", resources: Resources = Resources()):
        self.fn, self.args, self.label, self.resources = fn, args, label, resources
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


# ----------------------------------------------------------------------------------------------
# worker environments


class WorkerEnvironment:
    """Who runs the current task. A task asks ``worker_environment()`` for its identity (stored
    with the trial it takes); a coordinator asks the environment class of an identity it finds
    whether that worker is gone."""

    kind: ClassVar[str]

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "host": platform.node(), "pid": os.getpid()}

    def was(self, identity: dict[str, Any]) -> bool:
        """Whether ``identity`` is this worker's from before its backend restarted it (a
        requeued SLURM job keeps its job id); plain processes are never restarted."""
        return False

    def public_attrs(self) -> dict[str, Any]:
        """What a user wants to see beside the trial (job ids, log paths)."""
        return {}

    @classmethod
    def gone(cls, identity: dict[str, Any]) -> str | None:
        """Why the worker with this identity is gone, if that can be told from the identity
        alone (None: maybe alive; the heartbeat decides)."""
        return None


ENVIRONMENTS: dict[str, type[WorkerEnvironment]] = {}


def register_environment(cls: type[WorkerEnvironment]) -> type[WorkerEnvironment]:
    ENVIRONMENTS[cls.kind] = cls
    return cls


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@register_environment
class ProcessEnvironment(WorkerEnvironment):
    """A plain process (inline and local workers): gone when its pid is gone from its host."""

    kind = "process"

    @classmethod
    def gone(cls, identity: dict[str, Any]) -> str | None:
        if identity.get("host") == platform.node() and not _process_alive(identity["pid"]):
            return f"worker process {identity['pid']} on {identity['host']} is gone"
        return None


_current: WorkerEnvironment | None = None


def worker_environment() -> WorkerEnvironment:
    """The environment of the task running in this process (a plain process unless the
    backend that started it said otherwise)."""
    return _current or ProcessEnvironment()


@contextlib.contextmanager
def running_in(environment: WorkerEnvironment) -> Iterator[None]:
    global _current
    previous, _current = _current, environment
    try:
        yield
    finally:
        _current = previous


# ----------------------------------------------------------------------------------------------
# executors


class Executor(ABC):
    """Runs tasks and reports their states; a worker that dies leaves its task ``lost``
    (never silently pending). ``capacity``: how many tasks may be outstanding at once."""

    name: ClassVar[str]
    capacity: int = 1
    # Workers may run on other machines: the study's storage must be reachable and safe there.
    multi_node: ClassVar[bool] = False
    # Seconds without a heartbeat before a running trial of this backend's workers counts as lost.
    heartbeat_grace_s: ClassVar[float] = 120.0
    # CPUs a task gets when it does not ask (None: the machine's cores shared between workers).
    default_cpus: ClassVar[int | None] = None
    # The backend's own settings: a dataclass whose ``setting`` fields become flags (None: none).
    options_class: ClassVar[type | None] = None

    @classmethod
    @abstractmethod
    def from_options(cls, options: "ExecutorOptions", folder: Path, job_name: str) -> "Executor":
        """The executor the command-line options describe; ``folder`` may hold its files."""

    @classmethod
    def own_options(cls, options: "ExecutorOptions") -> Any:
        """This backend's settings out of ``options`` (its defaults where none were given)."""
        return options.backend_options.get(cls.name) or cls.options_class()

    @abstractmethod
    def submit(self, tasks: list[Task]) -> None:
        """Start the tasks (or queue them); their states change from here on."""

    def wait(self, tasks: list[Task], timeout: float) -> None:
        """Refresh the tasks' states, blocking up to ``timeout`` seconds for one to change."""

    def cancel(self, tasks: list[Task]) -> bool:
        """Stop unfinished tasks (running work gets Ctrl-C / scancel) and mark them; False when
        the work was left running on purpose (SLURM ``--detach``)."""
        return True

    def worker_gone(self, identity: dict[str, Any]) -> str | None:
        """Why the worker with this identity is gone, as far as this executor knows."""
        environment = ENVIRONMENTS.get(identity.get("kind", ""))
        return environment.gone(identity) if environment else None

    def close(self) -> None:
        pass


BACKENDS: dict[str, type[Executor]] = {}


def register_backend(cls: type[Executor]) -> type[Executor]:
    BACKENDS[cls.name] = cls
    return cls


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_option_classes() -> dict[str, type]:
    """Each registered backend's options dataclass, by backend name (for the flags)."""
    return {name: backend.options_class for name, backend in BACKENDS.items() if backend.options_class}


@dataclass
class ExecutorOptions:
    """Execution: where tasks run (a task is a trial of a search, or a training run of a report)"""

    executor: str | None = setting(None, "inline: in this process; local: --workers processes on this machine; "
                                   "slurm: one SLURM job per task", choices=backend_names,
                                   shown_default="local if --workers > 1, else inline")
    workers: int = setting(1, "tasks running at once")
    max_retries: int = setting(2, "retries of a task whose worker died (a retry resumes from its checkpoint)")
    resources: Resources = setting(default_factory=Resources, nested=True)
    # each backend's own settings by backend name (``Executor.options_class``); absent: its defaults
    backend_options: dict[str, Any] = setting(default_factory=dict, nested_by=backend_option_classes)

    @property
    def backend(self) -> str:
        return self.executor or ("local" if self.workers > 1 else "inline")
