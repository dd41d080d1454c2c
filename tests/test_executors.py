"""The executor contract: the same cases on every backend available (inline and local here;
SLURM when its cluster is up): a task that returns, one that raises, one whose worker is
killed (lost, and the backend says its worker is gone), and cancel."""

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import executor_tasks
import pytest

from clipse.executors import (
    CANCELLED,
    DONE,
    FAILED,
    LOST,
    ExecutorOptions,
    Resources,
    Task,
    executor_from_options,
)
from clipse.executors.slurm import SlurmOptions
from clipse.util.errors import UserError

BACKENDS = ["inline", "local", pytest.param("slurm", marks=[pytest.mark.slurm, pytest.mark.slow])]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """(name, make) where make(workers) builds a fresh executor of that backend."""
    name = request.param
    if name == "slurm":
        request.getfixturevalue("slurm_cluster")
        import cloudpickle

        cloudpickle.register_pickle_by_value(executor_tasks)  # the jobs cannot import the tests folder
    resources = Resources(cpus=1, mem_gb=1)
    slurm = SlurmOptions(poll_s=1, time_min=10)

    def make(workers=2):
        options = ExecutorOptions(executor=name, workers=1 if name == "inline" else workers, resources=resources,
                                  backend_options={"slurm": slurm})
        return executor_from_options(options, tmp_path / "jobs", job_name="contract")

    return name, make


def run_to_end(executor, tasks, timeout=300):
    executor.submit(tasks)
    deadline = time.time() + timeout
    while not all(t.finished for t in tasks) and time.time() < deadline:
        executor.wait([t for t in tasks if not t.finished], 1.0)
    assert all(t.finished for t in tasks), tasks
    return tasks


def test_tasks_return_their_results_with_the_backends_identity(backend):
    name, make = backend
    executor = make()
    tasks = run_to_end(executor, [Task(executor_tasks.identity, (i,), f"t{i}") for i in range(3)])
    executor.close()
    assert [t.state for t in tasks] == [DONE] * 3
    assert [t.result[0] for t in tasks] == [0, 1, 2]
    identities = [t.result[1] for t in tasks]
    assert {i["kind"] for i in identities} == {"slurm" if name == "slurm" else "process"}
    if name == "inline":
        assert {i["pid"] for i in identities} == {os.getpid()}
    else:
        assert os.getpid() not in {i["pid"] for i in identities}
    if name == "slurm":
        assert all(i["job"] == t.info["slurm_job"] for i, t in zip(identities, tasks))


def test_a_task_that_raises_fails_with_its_error(backend):
    _, make = backend
    executor = make()
    failed, refused = run_to_end(executor, [Task(executor_tasks.raises, ("boom",)),
                                            Task(executor_tasks.user_error, ("fix your flags",))])
    executor.close()
    assert failed.state == FAILED and "boom" in failed.error and not failed.user_error
    assert refused.state == FAILED and refused.user_error and refused.error == "fix your flags"


def test_a_killed_worker_leaves_its_task_lost_and_is_known_gone(backend):
    name, make = backend
    if name == "inline":
        pytest.skip("an inline task runs in the caller: killing it kills the caller")
    executor = make()
    lost, after = run_to_end(executor, [Task(executor_tasks.dies, ()), Task(executor_tasks.identity, ("after",))])
    assert lost.state == LOST and lost.error
    assert after.state == DONE and after.result[0] == "after"  # the backend goes on working
    identity = {"kind": "slurm", "job": lost.info["slurm_job"]} if name == "slurm" else \
        {"kind": "process", "host": platform.node(), "pid": lost.info["pid"]}
    assert executor.worker_gone(identity)
    alive = after.result[1] if name == "slurm" else {"kind": "process", "host": platform.node(), "pid": os.getpid()}
    assert executor.worker_gone(alive) is None
    executor.close()


def test_cancel_stops_running_and_queued_tasks(backend, tmp_path):
    name, make = backend
    if name == "inline":
        pytest.skip("an inline task has finished when submit returns: there is nothing to cancel")
    executor = make(workers=1)
    marker = tmp_path / "started"
    tasks = [Task(executor_tasks.sleeps, (600, str(marker))), Task(executor_tasks.identity, ("never",))]
    executor.submit(tasks)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline:
        executor.wait(tasks, 1.0)
    assert marker.exists()
    started = time.time()
    assert executor.cancel(tasks) is True
    assert [t.state for t in tasks] == [CANCELLED, CANCELLED]
    assert time.time() - started < 60
    if name == "local":  # the worker process is gone
        pid = int(Path(marker).read_text())
        assert executor.worker_gone({"kind": "process", "host": platform.node(), "pid": pid})
    executor.close()


def test_inline_refuses_several_workers(tmp_path):
    with pytest.raises(UserError, match="--executor inline runs one at a time"):
        executor_from_options(ExecutorOptions(executor="inline", workers=2), tmp_path)


def one_local_worker_sleeping(tmp_path):
    """(executor, its sleeping task, the worker's pid): one local worker in the middle of a task."""
    executor = executor_from_options(ExecutorOptions(executor="local", workers=1, resources=Resources(cpus=1)),
                                     tmp_path)
    marker = tmp_path / "started"
    sleeping = Task(executor_tasks.sleeps, (600, str(marker)))
    executor.submit([sleeping])
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        executor.wait([sleeping], 0.5)
    return executor, sleeping, int(marker.read_text())


def test_a_local_worker_interrupted_alone_is_replaced(tmp_path):
    """SIGINT to one worker (not to the coordinator) cancels its task; the next task gets a new worker."""
    import signal

    executor, interrupted, pid = one_local_worker_sleeping(tmp_path)
    os.kill(pid, signal.SIGINT)
    deadline = time.time() + 120
    while not interrupted.finished and time.time() < deadline:
        executor.wait([interrupted], 0.5)
    assert interrupted.state == CANCELLED
    (after,) = run_to_end(executor, [Task(executor_tasks.identity, ("after",))])
    assert after.state == DONE and after.result[1]["pid"] != pid
    executor.close()


def test_a_local_worker_killed_just_before_more_work_arrives_still_loses_its_task(tmp_path):
    """The new work reuses the dead worker's slot before any wait has seen the death: its task
    must end lost, not stay running forever (a search would wait for it without end)."""
    import signal

    executor, killed, pid = one_local_worker_sleeping(tmp_path)
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    while executor._workers[0][0].is_alive() and time.time() < deadline:
        time.sleep(0.05)
    after = Task(executor_tasks.identity, ("after",))
    executor.submit([after])  # dispatches into the dead worker's slot at once
    deadline = time.time() + 60
    while not (killed.finished and after.finished) and time.time() < deadline:
        executor.wait([t for t in (killed, after) if not t.finished], 0.5)
    assert killed.state == LOST and "died" in killed.error
    assert after.state == DONE and after.result[0] == "after"
    executor.close()


@pytest.mark.parametrize("task", ["returns", "raises"])
def test_a_local_worker_whose_coordinator_died_ends_quietly(tmp_path, capfd, task):
    """A killed search command leaves its workers to finish their trial (told to the study
    already); they cannot report it and must end quietly, not with a broken-pipe traceback."""
    import multiprocessing

    from clipse.executors.local import _local_worker

    context = multiprocessing.get_context("spawn")
    coordinator, child = context.Pipe()
    worker = context.Process(target=_local_worker, args=(child, None), daemon=True)
    worker.start()
    child.close()
    marker = tmp_path / "started"
    fn = executor_tasks.sleeps if task == "returns" else executor_tasks.sleeps_then_raises
    coordinator.send((fn, (1, str(marker)), 1))
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    coordinator.close()  # the coordinator is gone before the task ends
    worker.join(60)
    assert worker.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


def test_a_local_outcome_that_cannot_travel_fails_with_its_text(tmp_path):
    """A result or an exception that does not pickle reaches the coordinator as text."""
    executor = executor_from_options(ExecutorOptions(executor="local", workers=1, resources=Resources(cpus=1)),
                                     tmp_path)
    returned, raised, after = run_to_end(executor, [Task(executor_tasks.returns_unpicklable, ()),
                                                    Task(executor_tasks.raises_unpicklable, ()),
                                                    Task(executor_tasks.identity, ("after",))])
    executor.close()
    assert returned.state == FAILED and "pickle" in returned.error
    assert raised.state == FAILED and raised.error.startswith("ValueError: ") and "holds a lock" in raised.error
    assert after.state == DONE and after.result[0] == "after"


def test_loading_the_backends_imports_no_trainer():
    """Every local worker and SLURM job loads the backends before it knows what it runs; the
    trainer's imports (torch, open_clip, scikit-learn: about 5 s here) are paid by the work that
    trains, not by every process that starts."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, clipse.executors; "
                             "print(sorted(m for m in ('torch', 'open_clip', 'sklearn', 'clipse.training') "
                             "if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
