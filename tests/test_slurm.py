"""The SLURM executor against a real (one-node) SLURM cluster with accounting.

Each test runs `python -m clipse.search --executor slurm` as a user would and checks the study
it leaves: exact totals, job ids in the trials, lost jobs retried, requeued jobs resumed,
refused submissions reported in one line with nothing lost, Ctrl-C cancelling the jobs.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    assert_first_trial_retried,
    epochs_done,
    load_study,
    wait_for,
    was_retried,
)
from optuna.trial import TrialState

from clipse.search.study import LOST_ATTR, OWNER_ATTR, count_trials

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY = ["--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12",
        "--batch-size", "16", "--epochs", "2", "--cpus-per-task", "1", "--mem-gb", "2", "--slurm-poll", "1",
        "--time-min", "20"]
SLOW = ["--pretrained", "none", "--shapes-train-images", "400", "--shapes-val-images", "100", "--shapes-test-images", "100", "--epochs", "3",
        "--pruner", "none"]


def args_for(tmp_path, space, trials, *extra):
    return ["--space", space, "--trials", str(trials), "--executor", "slurm", "--studies-dir",
            str(tmp_path / "studies"), "--data-root", str(tmp_path / "shapes"), *TINY, *extra]


def start(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(tmp_path, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


def squeue(name):
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


@pytest.mark.long
def test_trials_run_as_a_job_array_with_fake_gpus(slurm_cluster, tmp_path):
    """... and record to the study's MLflow store (the default SQLite file) from their jobs."""
    result = run(tmp_path, *args_for(tmp_path, "debias", 2, "--workers", "2", "--gpus-per-node", "1",
                                     "--report-to", "mlflow"))
    assert result.returncode == 0, result.stderr
    study = load_study(tmp_path, "debias")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    arrays = {t.user_attrs["slurm_job_id"] for t in trials}
    assert len(arrays) == 1  # one array for the whole batch
    for t in trials:
        assert Path(t.user_attrs["slurm_stdout"]).is_file() and Path(t.user_attrs["slurm_stderr"]).is_file()
        assert t.user_attrs[OWNER_ATTR]["job"].startswith(t.user_attrs["slurm_job_id"] + "_")
    script = next((tmp_path / "studies" / "debias" / "slurm").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --array=0-1%2" in script
    assert "2/2 trials done" in result.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'studies' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("clipse").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("clipse.role") == "study")
    nested = sorted(r.data.tags["clipse.trial"] for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert nested == ["0", "1"]


def test_refused_submission_is_one_line_and_loses_nothing(slurm_cluster, tmp_path):
    refused = run(tmp_path, *args_for(tmp_path, "baseline", 1, "--gpus-per-node", "4"))
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "SLURM refused the submission" in lines[0]
    assert "Requested node configuration is not available" in lines[0] and "Traceback" not in refused.stderr
    assert len(load_study(tmp_path, "baseline").get_trials()) == 0
    again = run(tmp_path, *args_for(tmp_path, "baseline", 1))  # the study is intact and usable
    assert again.returncode == 0, again.stderr
    assert count_trials(load_study(tmp_path, "baseline")).complete == 1


def test_sqlite_storage_is_refused_for_slurm(slurm_cluster, tmp_path):
    result = run(tmp_path, *args_for(tmp_path, "baseline", 1, "--storage", f"sqlite:///{tmp_path}/s.db"))
    assert result.returncode == 2 and "SQLite is not safe for slurm jobs" in result.stderr


@pytest.mark.recovery
def test_killed_job_is_retried_from_its_checkpoint(slurm_cluster, tmp_path):
    process = start(tmp_path, *args_for(tmp_path, "baseline", 1, *SLOW))
    assert wait_for(lambda: epochs_done(tmp_path, "baseline") >= 1)
    owner = load_study(tmp_path, "baseline").get_trials()[0].user_attrs[OWNER_ATTR]
    os.kill(owner["pid"], signal.SIGKILL)  # the worker dies (as under the OOM killer)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    lost, retry = assert_first_trial_retried(load_study(tmp_path, "baseline"), total=1)
    assert owner["job"] in lost.system_attrs[LOST_ATTR] or "heartbeat" in lost.system_attrs[LOST_ATTR]
    assert retry.user_attrs["slurm_job_id"] != lost.user_attrs["slurm_job_id"]


@pytest.mark.recovery
@pytest.mark.parametrize("how", ["scontrol requeue", "SIGUSR2 before the time limit"])
def test_a_requeued_job_resumes_its_trial(slurm_cluster, tmp_path, how):
    process = start(tmp_path, *args_for(tmp_path, "baseline", 1, *SLOW))
    assert wait_for(lambda: epochs_done(tmp_path, "baseline") >= 1)
    job = load_study(tmp_path, "baseline").get_trials()[0].user_attrs[OWNER_ATTR]["job"]
    if how == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", job], check=True)
    else:  # what SLURM sends before a time limit (--signal=USR2@90): submitit checkpoints and requeues
        subprocess.run(["scancel", job, "--signal", "USR2"], check=True)
    # a requeued job waits two minutes before it may start again; once it is pending, start it now
    assert wait_for(lambda: ["PENDING"] in [row[1:] for row in squeue("baseline")], timeout=60)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    study = load_study(tmp_path, "baseline")
    trials = study.get_trials()
    assert len(trials) == 1 and trials[0].state == TrialState.COMPLETE  # the same trial, continued
    rows = pd.read_csv(Path(trials[0].user_attrs["run_dir"]) / "epochs.csv")
    assert rows["epoch"].tolist() == [1, 2, 3]
    assert rows["trained_by_pid"].nunique() == 2  # the first run of the job, then its requeued run
    restarts = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts


@pytest.mark.recovery
@pytest.mark.parametrize("detach", [False, True], ids=["cancel", "detach"])
def test_ctrl_c_cancels_the_jobs_or_with_detach_leaves_them_running(slurm_cluster, tmp_path, detach):
    name = "detached" if detach else "cancel-me"
    process = start(tmp_path, *args_for(tmp_path, "baseline", 1, *SLOW, "--study", name, *(["--detach"] * detach)))
    assert wait_for(lambda: epochs_done(tmp_path, name) >= 1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    if not detach:
        assert "none left running. Resume (or watch) with:" in err
        assert wait_for(lambda: not squeue(name), timeout=60)
        study = load_study(tmp_path, name)
        assert TrialState.RUNNING not in [t.state for t in study.get_trials()]
        assert was_retried(study, study.get_trials()[0])
        return
    assert "1 left running in detached jobs" in err
    assert squeue(name)  # the job runs on without the coordinator
    assert wait_for(lambda: count_trials(load_study(tmp_path, name)).complete == 1, timeout=300)
    study = load_study(tmp_path, name)
    assert LOST_ATTR not in study.get_trials()[0].system_attrs and not was_retried(study, study.get_trials()[0])


def test_a_data_parallel_trial_runs_as_one_job_of_two_tasks(slurm_cluster, tmp_path):
    """--nproc 2: one job per trial with 2 tasks on the node; rank 0 (task 0) reports the trial."""
    result = run(tmp_path, *args_for(tmp_path, "debias", 1, "--nproc", "2", "--pruner", "none"))
    assert result.returncode == 0, result.stderr
    (trial,) = load_study(tmp_path, "debias").get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["epochs_done"] == 2
    job = trial.user_attrs["slurm_job_id"]
    logs = sorted(p.name for p in (tmp_path / "studies" / "debias" / "slurm").rglob(f"{job}*_log.out"))
    assert len(logs) == 2, logs  # one log per task: both ranks ran in the job
    assert "nproc: 2" in (Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text()
