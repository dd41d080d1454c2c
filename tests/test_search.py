"""The search end to end on tiny data, through its Python API and its command: trial counts,
resume, Ctrl-C, kills, workers, bad input, and a real optuna-dashboard reading the study over
HTTP."""

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from helpers import epochs_done, load_study, wait_for, was_retried
from optuna.trial import TrialState

from clipse.executors import ExecutorOptions
from clipse.runs.folder import RunFolder, TrainResult
from clipse.search import objective as objective_module
from clipse.search.command import SearchOptions, TrialWorkload, run_search
from clipse.search.command import main as search_main
from clipse.search.objective import StudyRef
from clipse.search.spaces import SearchSpace
from clipse.search.study import (
    HEARTBEAT_ATTR,
    LOST_ATTR,
    OWNER_ATTR,
    RETRY_OF_ATTR,
    SETTINGS_ATTR,
    count_trials,
    open_storage,
    retry_lost_trial,
    retry_orphaned_losses,
    stored_settings,
    sweep_lost_trials,
    take_trial,
)
from clipse.search.study import load_study as load_study_as_a_worker
from clipse.training.trainer import EpochReport
from clipse.util.errors import UserError

TINY = ["--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12",
        "--batch-size", "16", "--epochs", "2"]
TINY_TRAINING = {"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12, "batch_size": 16,
                 "epochs": 2}


def search_args(tmp_path, space="bandpass", trials=3, *extra):
    return ["--space", space, "--trials", str(trials), "--studies-dir", str(tmp_path / "studies"),
            "--data-root", str(tmp_path / "shapes"), *TINY, *extra]


def options(tmp_path, space="bandpass", trials=3, training=None, execution=None, **changes) -> SearchOptions:
    return SearchOptions(space=space, trials=trials, studies_dir=tmp_path / "studies",
                         training={**TINY_TRAINING, "data_root": str(tmp_path / "shapes"), **(training or {})},
                         execution=execution or ExecutorOptions(), **changes)


def cli(tmp_path, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "clipse.search", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=timeout)


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


@pytest.fixture(autouse=True)
def _run_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the registry lands next to the studies folder


@pytest.mark.slow
def test_inline_search_records_everything(tmp_path, capsys):
    code = search_main(search_args(tmp_path, "bandpass", 3, "--pruner", "none", "--seed", "3"))
    out = capsys.readouterr()
    assert code == 0, out.err
    study = load_study(tmp_path, "bandpass")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 3  # distinct samples
    for t in trials:
        assert set(t.intermediate_values) == {1, 2}
        assert t.value == max(t.intermediate_values.values())  # the best epoch's value
        attrs = t.user_attrs
        assert Path(attrs["run_dir"]).is_dir() and attrs["epochs_done"] == 2
        assert {"val_r1_mean", "val_i2t_r1", "val_t2i_mr", "weights_weight_std", "weights_band_coverage"} <= set(attrs)
        artifacts = [a for key, a in t.system_attrs.items() if key.startswith("artifacts:")]
        assert sorted(json.loads(a)["filename"] for a in artifacts) == ["dynamics.png", "training.csv"]
    settings = study.user_attrs[SETTINGS_ATTR]
    assert settings["sampler"] == "tpe" and settings["seed"] == 3 and settings["pruner"] == "none"
    assert "optuna-dashboard " + str(tmp_path / "studies" / "bandpass" / "journal.log") in out.out
    assert "top trials of 'bandpass'" in out.out
    assert "3/3 trials done" in out.err
    registry = (tmp_path / "studies" / "run_registry.csv").read_text().splitlines()
    assert len(registry) == 4 and all("bandpass" in line for line in registry[1:])
    # each row names its trial: the number of the trial whose run folder it is
    rows = list(csv.DictReader(io.StringIO("\n".join(registry))))
    by_run = {t.user_attrs["run_dir"]: t.number for t in trials}
    assert sorted(int(row["trial"]) for row in rows) == [0, 1, 2]
    assert all(int(row["trial"]) == by_run[row["run_dir"]] for row in rows)


@pytest.mark.slow
def test_run_search_returns_what_the_study_holds(tmp_path):
    result = run_search(options(tmp_path, "debias", 2, pruner="none", min_weight_std=0.0))
    study = load_study(tmp_path, "debias")
    assert result.study == "debias" and result.storage == str(tmp_path / "studies" / "debias" / "journal.log")
    assert result.counts.complete == 2 and not result.interrupted
    best = max(study.get_trials(), key=lambda t: t.value)
    assert result.best["trial"] == best.number and result.best["value"] == best.value
    assert {k: result.best[k] for k in best.params} == best.params
    assert result.dashboard_command.startswith(f"optuna-dashboard {result.storage} --artifact-dir ")


@pytest.mark.slow
def test_seeded_inline_search_is_reproducible(tmp_path):
    for name in ("a", "b"):
        assert run_search(options(tmp_path, "debias", 2, study=name, seed=5)).counts.finished == 2
    a, b = load_study(tmp_path, "a").get_trials(), load_study(tmp_path, "b").get_trials()
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.value for t in a] == [t.value for t in b]


@pytest.mark.slow
def test_trials_is_the_total_and_resume_repeats_nothing(tmp_path):
    assert run_search(options(tmp_path, "baseline", 2)).counts.finished == 2
    first = [(t.number, t.params, t.value) for t in load_study(tmp_path, "baseline").get_trials()]
    assert run_search(options(tmp_path, "baseline", 4)).counts.finished == 4
    trials = load_study(tmp_path, "baseline").get_trials()
    assert len(trials) == 4 and [(t.number, t.params, t.value) for t in trials[:2]] == first
    assert run_search(options(tmp_path, "baseline", 4)).counts.finished == 4  # already complete: nothing to do
    assert len(load_study(tmp_path, "baseline").get_trials()) == 4
    assert len(list((tmp_path / "studies" / "baseline" / "runs").iterdir())) == 4


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tmp_path):
    run_search(options(tmp_path, "baseline", 1))
    with pytest.raises(UserError, match=r"created with other settings: --pruner hyperband \(study has median\)"):
        run_search(options(tmp_path, "baseline", 2, pruner="hyperband"))
    with pytest.raises(UserError, match=r"--epochs 3 \(study has 2\)"):
        run_search(options(tmp_path, "baseline", 2, training={"epochs": 3}))


def test_unknown_space_and_bad_values(tmp_path, capsys):
    assert search_main(["--space", "nope", "--trials", "2"]) == 2
    assert "unknown search space 'nope' (available: bandpass, baseline, dcl, debias" in capsys.readouterr().err
    with pytest.raises(UserError, match="--trials must be at least 1"):
        run_search(SearchOptions(space="baseline", trials=0))
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  m1: {type: float, low: 0.5, high: 0.1}\n")
    assert search_main(["--space", str(bad), "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml: params.m1: needs low < high" in err[0]


@pytest.mark.slow
def test_invalid_parameters_are_pruned_not_trained(tmp_path):
    space = tmp_path / "overlap.yaml"
    space.write_text("fixed: {loss: sanw_bandpass}\nparams:\n"
                     "  m1: {type: float, low: 0.5, high: 0.9}\n  m2: {type: float, low: 0.1, high: 0.6}\n")
    result = run_search(options(tmp_path, str(space), 2))
    assert result.counts.complete == 0 and result.best is None  # the command exits 1 for this
    trials = load_study(tmp_path, "overlap").get_trials()
    assert states(load_study(tmp_path, "overlap")) == [TrialState.PRUNED] * 2
    assert all("the band needs m1 < m2" in t.user_attrs["rejected"] for t in trials)
    assert not (tmp_path / "studies" / "overlap" / "runs").exists()


@pytest.mark.slow
def test_a_trial_that_raises_fails_with_its_error_and_the_rest_continue(tmp_path):
    space = tmp_path / "models.yaml"
    space.write_text("params:\n  model: {type: categorical, choices: [clipse-tiny, no-such-model]}\n")
    result = run_search(options(tmp_path, str(space), 6, sampler="random", seed=1))
    assert result.counts.finished == 6
    trials = load_study(tmp_path, "models").get_trials()
    assert len(trials) == 6
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["model"] == "no-such-model" for t in failed)
    assert all("unknown model 'no-such-model'" in t.user_attrs["error"] for t in failed)
    assert all(t.state == TrialState.COMPLETE for t in trials if t.params["model"] == "clipse-tiny")


@pytest.mark.parametrize("max_retries,retried", [(0, False), (1, True)])
def test_stopping_a_session_honours_max_retries(tmp_path, max_retries, retried):
    """After a cancel (Ctrl-C, or SLURM jobs cancelled) the session's RUNNING trials are failed,
    and retried only within --max-retries."""
    storage = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    trial = study.ask()
    trial.suggest_float("lr", 0.1, 1.0)
    trial.set_user_attr(OWNER_ATTR, {"kind": "process", "host": "elsewhere", "pid": 1, "session": "mine"})
    other = study.ask()
    other.set_user_attr(OWNER_ATTR, {"kind": "process", "host": "elsewhere", "pid": 2, "session": "theirs"})
    ref = StudyRef(name="s", storage=storage, study_dir=str(tmp_path), session="mine", total=2)
    TrialWorkload(study, ref, ExecutorOptions(max_retries=max_retries), grace_s=600).stopped(True)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "stopped" in trials[0].system_attrs[LOST_ATTR]
    assert trials[1].state == TrialState.RUNNING  # another session's trial is left alone
    assert was_retried(study, trials[0]) is retried
    if retried:
        assert trials[2].state == TrialState.WAITING and trials[2].params == trials[0].params


def _study_with_running_trials(tmp_path, *owners_and_beats):
    """A journal study whose RUNNING trials have the given (owner, seconds since last heartbeat)."""
    study = optuna.create_study(study_name="s", storage=open_storage(str(tmp_path / "journal.log")),
                                direction="maximize")
    for owner, age in owners_and_beats:
        trial = study.ask()
        trial.suggest_float("lr", 0.1, 1.0)
        trial.set_user_attr(OWNER_ATTR, owner)
        trial.set_user_attr(HEARTBEAT_ATTR, time.time() - age)
    return study


def test_a_stale_heartbeat_marks_a_trial_lost_and_a_fresh_one_does_not(tmp_path):
    elsewhere = {"kind": "process", "host": "another-host", "pid": 1, "session": "s"}  # no pid to check here
    study = _study_with_running_trials(tmp_path, (elsewhere, 1000.0), (elsewhere, 5.0))
    assert sweep_lost_trials(study, grace_s=120, worker_gone=lambda owner: None, max_retries=2,
                             lock=tmp_path / "ask.lock") == [0]
    stale, fresh, retry = study.get_trials()
    assert stale.state == TrialState.FAIL and stale.system_attrs[LOST_ATTR].startswith("no heartbeat for")
    assert fresh.state == TrialState.RUNNING
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == 0 and retry.params == stale.params


def test_a_trial_out_of_retries_fails_for_good(tmp_path):
    study = _study_with_running_trials(tmp_path, ({"kind": "process", "host": "h", "pid": 1, "session": "s"}, 0))
    lost = study.get_trials()[0]
    for attempt, retried in ((1, True), (2, True), (3, False)):  # --max-retries 2: two retries, then no more
        assert retry_lost_trial(study, lost, "lost in a test", max_retries=2, lock=tmp_path / "ask.lock")
        assert was_retried(study, lost) is retried
        if not retried:
            break
        lost = study.ask()  # the retry runs, and is lost in turn
        assert lost.user_attrs["attempt"] == attempt + 1
        lost = next(t for t in study.get_trials() if t.number == lost.number)
    counts = count_trials(study)
    assert counts.failed == 1 and counts.waiting == 0 and len(study.get_trials()) == 3
    assert retry_orphaned_losses(study, max_retries=2, lock=tmp_path / "ask.lock") == []  # out of retries: no orphan


def test_a_trial_lost_before_drawing_its_parameters_is_replaced_by_a_fresh_draw(tmp_path):
    """A worker killed between taking its trial and drawing its parameters (a window a storage
    outage can stretch to seconds) trained nothing: the trial it held is not one failed for good,
    or the search would end short of its total; its retry draws parameters of its own."""
    study = optuna.create_study(study_name="s", storage=open_storage(str(tmp_path / "journal.log")),
                                direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    held = study.ask()
    held.set_user_attr(OWNER_ATTR, {"kind": "process", "host": "h", "pid": 1, "session": "s"})
    assert sweep_lost_trials(study, grace_s=120, worker_gone=lambda owner: "worker process 1 on h is gone",
                             max_retries=2, lock=tmp_path / "ask.lock") == [held.number]
    assert count_trials(study).failed == 0 and count_trials(study).waiting == 1
    retry = study.ask()
    assert retry.user_attrs[RETRY_OF_ATTR] == held.number and retry.user_attrs["attempt"] == 2
    retry.suggest_float("lr", 0.1, 1.0)
    study.tell(retry, 1.0)
    counts = count_trials(study)
    assert counts.complete == 1 and counts.failed == 0 and counts.finished == 1


def _fail_as_lost_without_retry(study, trial, reason="worker gone"):
    """What a sweeper killed between its two writes leaves: the FAIL, and no retry."""
    study._storage.set_trial_system_attr(trial._trial_id, LOST_ATTR, reason)
    study.tell(trial.number, state=TrialState.FAIL)


def test_a_lost_trial_whose_retry_was_never_added_gets_it_once(tmp_path):
    owner = {"kind": "process", "host": "h", "pid": 1, "session": "s"}
    study = _study_with_running_trials(tmp_path, (owner, 0), (owner, 0), (owner, 0))
    orphan, real_failure, plain_fail = study.get_trials()
    _fail_as_lost_without_retry(study, orphan)
    study._storage.set_trial_user_attr(real_failure._trial_id, "error", "ValueError: a bug")  # its run failed
    _fail_as_lost_without_retry(study, real_failure)
    study.tell(plain_fail.number, state=TrialState.FAIL)  # failed by its worker: not a loss
    assert count_trials(study).failed == 3
    assert retry_orphaned_losses(study, max_retries=2, lock=tmp_path / "ask.lock") == [orphan.number]
    retry = study.get_trials()[-1]
    assert retry.state == TrialState.WAITING and retry.user_attrs[RETRY_OF_ATTR] == orphan.number
    assert retry.params == orphan.params and LOST_ATTR not in retry.system_attrs
    assert retry_orphaned_losses(study, max_retries=2, lock=tmp_path / "ask.lock") == []  # once
    assert count_trials(study).failed == 2


@pytest.mark.slow
def test_a_search_gives_an_orphaned_loss_its_retry(tmp_path):
    """A search resumed after a sweeper stopped between a lost trial's FAIL and its retry trains
    the retry, instead of ending with a trial failed for good."""
    assert run_search(options(tmp_path, "baseline", 1, pruner="none")).counts.finished == 1
    study = optuna.load_study(study_name="baseline", storage=open_storage(str(tmp_path / "studies" / "baseline" / "journal.log")))
    lost = study.ask()
    lost.suggest_float("lr", 1e-4, 3e-3, log=True)
    _fail_as_lost_without_retry(study, study.get_trials()[-1])
    result = run_search(options(tmp_path, "baseline", 2, pruner="none"))
    assert result.counts.failed == 0 and result.counts.complete == 2
    retry = study.get_trials()[-1]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[RETRY_OF_ATTR] == lost.number


def RANDOM(trials_so_far):
    return optuna.samplers.RandomSampler(seed=trials_so_far)


def test_two_workers_that_loaded_the_study_together_draw_different_parameters(tmp_path):
    """Both workers counted the same trials when they loaded the study; the sampler each asks
    with is built under the ask lock, so the second one's seed has moved past the first's trial."""
    run_search(options(tmp_path, "baseline", 1, pruner="none"))
    storage = str(tmp_path / "studies" / "baseline" / "journal.log")
    first, second = load_study_as_a_worker("baseline", storage), load_study_as_a_worker("baseline", storage)  # same count
    settings = stored_settings(first)
    space = SearchSpace.from_dict(settings.space_definition)
    drawn = [space.suggest(take_trial(worker, 3, tmp_path / "ask.lock", settings.build_sampler))
             for worker in (first, second)]
    assert drawn[0] != drawn[1]


def test_two_workers_asking_at_once_never_take_more_than_the_total(tmp_path, monkeypatch):
    """One trial short of the total, two workers ask at the same moment: one gets the trial, the
    other nothing. (Checking and asking apart, both created one, and the surplus trial finished
    the study while a retry was still queued.)"""
    storage = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    study.tell(study.ask(), 1.0)
    plain_ask = optuna.Study.ask

    def slow_ask(self, *args, **kwargs):  # widen the gap between a worker's count and its new trial
        time.sleep(0.5)
        return plain_ask(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "ask", slow_ask)
    taken = []

    def worker():
        own = optuna.load_study(study_name="s", storage=open_storage(storage))  # each worker opens the study
        taken.append(take_trial(own, 2, tmp_path / "ask.lock", RANDOM))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(trial is None for trial in taken) == [False, True]
    assert len(study.get_trials()) == 2
    next(trial for trial in taken if trial).suggest_float("lr", 0.1, 1.0)
    retry = study.get_trials()[1]  # lost: its retry is still taken, though the total is reached
    assert retry_lost_trial(study, retry, "lost in a test", max_retries=1, lock=tmp_path / "ask.lock")
    assert take_trial(study, 2, tmp_path / "ask.lock", RANDOM).number == 2
    assert take_trial(study, 2, tmp_path / "ask.lock", RANDOM) is None


@pytest.mark.slow
def test_the_median_pruner_stops_hopeless_trials(tmp_path):
    space = tmp_path / "hopeless.yaml"
    space.write_text("params:\n  lr: {type: categorical, choices: [1.0e-9, 2.0e-3]}\n")  # 1e-9 learns nothing
    run_search(options(tmp_path, str(space), 9, sampler="random", seed=4))
    trials = load_study(tmp_path, "hopeless").get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.user_attrs["epochs_done"] < 2 and t.params["lr"] == 1e-9 for t in pruned)
    assert all(t.user_attrs["epochs_done"] == 2 for t in trials if t.state == TrialState.COMPLETE)


@pytest.mark.slow
def test_a_study_whose_space_file_changed_is_refused(tmp_path):
    space = tmp_path / "mine.yaml"
    space.write_text("params:\n  lr: {type: float, low: 1.0e-3, high: 3.0e-3}\n")
    run_search(options(tmp_path, str(space), 1, training={"epochs": 1}))
    space.write_text("params:\n  lr: {type: float, low: 1.0e-3, high: 4.0e-3}\n")
    with pytest.raises(UserError, match=r"search space .*mine.yaml changed since the study was created"):
        run_search(options(tmp_path, str(space), 2, training={"epochs": 1}))
    assert len(load_study(tmp_path, "mine").get_trials()) == 1


@pytest.mark.slow
def test_a_diverged_trial_returns_its_best_value_before_the_divergence(tmp_path, diverging_loss):
    space = tmp_path / "diverging.yaml"
    # 240 pairs in batches of 16: 15 steps an epoch, so step 20 is in epoch 2
    space.write_text("fixed: {loss: diverges, diverge_at: 20}\nparams:\n  lr: {type: float, low: 1.0e-3, high: 3.0e-3}\n")
    result = run_search(options(tmp_path, str(space), 1, training={"epochs": 3}))
    trial = load_study(tmp_path, "diverging").get_trials()[0]
    assert trial.state == TrialState.COMPLETE and result.counts.complete == 1
    assert trial.user_attrs["status"] == "diverged" and trial.user_attrs["diverged_step"] == 20
    assert list(trial.intermediate_values) == [1] and trial.value == trial.intermediate_values[1] > 0


SLOW_TRIAL = ["--pretrained", "none", "--shapes-train-images", "400", "--shapes-val-images", "100", "--shapes-test-images", "100",
              "--epochs", "3"]  # long enough to be interrupted mid-trial


@pytest.mark.recovery
@pytest.mark.slow
def test_ctrl_c_leaves_nothing_running_and_resume_finishes(tmp_path):
    args = search_args(tmp_path, "baseline", 1, "--pruner", "none", *SLOW_TRIAL)
    process = subprocess.Popen([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: epochs_done(tmp_path, "baseline") >= 1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "none left running. Resume (or watch) with:" in err and "python -m clipse.search --space baseline" in err
    study = load_study(tmp_path, "baseline")
    assert TrialState.RUNNING not in states(study)
    interrupted = study.get_trials()[0]
    assert interrupted.state == TrialState.FAIL and was_retried(study, interrupted)
    assert "interrupted" in interrupted.system_attrs[LOST_ATTR]

    resumed = cli(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr
    study = load_study(tmp_path, "baseline")
    counts = count_trials(study)
    assert counts.complete == 1 and counts.running == 0
    retry = next(t for t in study.get_trials() if t.user_attrs.get("retry_of") == interrupted.number)
    assert retry.state == TrialState.COMPLETE and retry.params == interrupted.params
    assert retry.user_attrs["run_dir"] == interrupted.user_attrs["run_dir"]  # resumed the same run folder
    epochs = (Path(retry.user_attrs["run_dir"]) / "epochs.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in epochs[1:]] == ["1", "2", "3"]  # no epoch trained twice
    assert sorted(retry.intermediate_values) == [1, 2, 3]


@pytest.mark.recovery
@pytest.mark.slow
def test_killed_coordinator_then_rerun_recovers(tmp_path):
    """kill -9 of an inline search: its trial stays RUNNING with a dead pid on this host; the
    next run fails it at once and retries it from its checkpoint."""
    args = search_args(tmp_path, "baseline", 1, "--pruner", "none", *SLOW_TRIAL)
    process = subprocess.Popen([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: epochs_done(tmp_path, "baseline") >= 1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert states(load_study(tmp_path, "baseline"))[0] == TrialState.RUNNING
    resumed = cli(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr
    study = load_study(tmp_path, "baseline")
    first = study.get_trials()[0]
    assert first.state == TrialState.FAIL and "is gone" in first.system_attrs[LOST_ATTR]
    counts = count_trials(study)
    assert counts.complete == 1 and counts.running == 0 and counts.failed == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_optuna_dashboard_reads_the_study_over_http(tmp_path):
    assert run_search(options(tmp_path, "debias", 2)).counts.finished == 2
    journal = tmp_path / "studies" / "debias" / "journal.log"
    port = _free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), str(journal), "--port", str(port), "--host", "127.0.0.1",
         "--artifact-dir", str(tmp_path / "studies" / "debias" / "artifacts")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                return _get_json(f"{base}/api/studies")
            except OSError:
                return None

        if not wait_for(up, timeout=60, interval=0.3):
            dashboard.kill()
            pytest.fail("dashboard did not start: " + dashboard.communicate()[0].decode()[-2000:])
        summaries = _get_json(f"{base}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["debias"]
        detail = _get_json(f"{base}/api/studies/{summaries[0]['study_id']}")
        assert len(detail["trials"]) == 2
        trial = detail["trials"][0]
        assert trial["state"] == "Complete" and [v["step"] for v in trial["intermediate_values"]] == [1, 2]
        assert {a["filename"] for a in trial["artifacts"]} == {"training.csv", "dynamics.png"}
        assert any(a["key"] == "val_r1_mean" for a in trial["user_attrs"])
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.long
def test_local_workers_share_a_postgresql_study(tmp_path, postgres_url):
    result = cli(tmp_path, *search_args(tmp_path, "bandpass", 6, "--workers", "3", "--storage", postgres_url))
    assert result.returncode == 0, result.stderr
    assert f"optuna-dashboard {postgres_url}" in result.stdout
    study = optuna.load_study(study_name="bandpass", storage=postgres_url)
    counts = count_trials(study)
    assert counts.finished == 6 and counts.running == 0 and len(study.get_trials()) == 6
    assert len({t.user_attrs[OWNER_ATTR]["pid"] for t in study.get_trials()}) > 1


def test_unreachable_storage_is_one_line(tmp_path, capsys):
    assert search_main(["--space", "baseline", "--trials", "1", "--storage",
                        "postgresql://nobody@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: storage postgresql://nobody@127.0.0.1:1/none: cannot open")


@pytest.mark.slow
def test_the_pruner_sees_each_epochs_value_not_the_best_so_far(tmp_path, monkeypatch):
    """A single-seed trial reports every epoch's own value, also when it falls below an earlier one."""
    values = [0.30, 0.10, 0.20]

    def fake_train(config, callbacks=()):
        folder = RunFolder(config.run_dir)
        folder.path.mkdir(parents=True, exist_ok=True)
        for epoch, value in enumerate(values, start=1):
            for callback in callbacks:
                callback(EpochReport(epoch, len(values), {"val_r1_mean": value}, {}, folder.path))
        return TrainResult(run_id="fake", run_dir=str(folder.path), status="completed", epochs_done=3, best_epoch=1,
                           best_value=0.30, best_metrics={"val_r1_mean": 0.30}, last_metrics={}, weight_stats={})

    monkeypatch.setattr(objective_module, "train", fake_train)
    run_search(options(tmp_path, "baseline", 1, pruner="none"))
    trial = load_study(tmp_path, "baseline").get_trials()[0]
    assert trial.intermediate_values == {1: 0.30, 2: 0.10, 3: 0.20} and trial.value == 0.30


@pytest.mark.slow
def test_heartbeat_grace_is_in_seconds(tmp_path):
    """A trial whose worker elsewhere last beat 90 s ago is lost under --heartbeat-grace 30: the
    search retries it and finishes (read in minutes, the grace would hold it RUNNING forever)."""
    args = search_args(tmp_path, "baseline", 1, "--epochs", "1")
    assert cli(tmp_path, *args).returncode == 0
    study = load_study(tmp_path, "baseline")
    trial = study.ask()
    trial.suggest_float("lr", 5e-4, 5e-3, log=True)  # a running trial of another host, silent for 90 s
    trial.set_user_attr(OWNER_ATTR, {"kind": "process", "host": "another-host", "pid": 1, "session": "gone"})
    trial.set_user_attr(HEARTBEAT_ATTR, time.time() - 90)
    args[args.index("--trials") + 1] = "2"
    finished = cli(tmp_path, *args, "--heartbeat-grace", "30", timeout=120)
    assert finished.returncode == 0, finished.stderr
    counts = count_trials(load_study(tmp_path, "baseline"))
    assert counts.complete == 2 and counts.running == 0


@pytest.mark.slow
def test_a_study_of_clipse_0_1_is_not_resumed(tmp_path):
    """Its values were scored with ties counted for the relevant item: they do not mix with tie-aware ones."""
    run_search(options(tmp_path, "baseline", 1, training={"epochs": 1}))
    study = load_study(tmp_path, "baseline")
    settings = dict(study.user_attrs[SETTINGS_ATTR])
    settings.pop("rank_rule")
    study.set_user_attr(SETTINGS_ATTR, settings)
    with pytest.raises(UserError, match="^study 'baseline' was made by clipse 0.1, whose ranks counted ties"):
        run_search(options(tmp_path, "baseline", 2, training={"epochs": 1}))
