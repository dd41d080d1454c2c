"""A study's storage rides out outages: connection errors are retried until the storage answers
or the grace period ends; integrity errors and other failures are not; the wait is said once.
The real thing, a PostgreSQL server stopped during a search, is at the end (marked postgres)."""

import errno
import os
import random
import re
import subprocess
import sys
import threading
import time

import optuna
import pytest
from helpers import wait_for
from optuna.storages import InMemoryStorage
from sqlalchemy import exc as sql
from test_search import search_args

from clipse.runs.folder import RunFolder
from clipse.search import outages
from clipse.search.outages import OutageTolerantStorage, is_transient
from clipse.search.study import RETRY_OF_ATTR, count_trials, retry_lost_trial
from clipse.util.errors import StorageUnreachable

REFUSED = sql.OperationalError("connect", {}, OSError(errno.ECONNREFUSED, "Connection refused"))


class Flaky(InMemoryStorage):
    """Its ``get_all_studies`` fails with ``error`` the first ``failures`` times."""

    def __init__(self, failures: int, error: Exception = REFUSED):
        super().__init__()
        self.failures, self.error, self.calls = failures, error, 0

    def get_all_studies(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return super().get_all_studies()


@pytest.fixture(autouse=True)
def _announcing(monkeypatch):
    monkeypatch.setattr(outages, "_ANNOUNCING", [True])
    monkeypatch.setattr(outages, "_OUTAGES", {})
    monkeypatch.setattr(outages, "FIRST_WAIT_S", 0.01)


def test_a_short_outage_is_waited_out_and_said_once(capsys):
    inner = Flaky(failures=4)
    storage = OutageTolerantStorage(inner, "postgresql://u@db/x", grace_s=30)
    assert storage.get_all_studies() == [] and inner.calls == 5
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("storage postgresql://u@db/x unreachable (OperationalError:")
    assert "Connection refused), retrying for up to 30 s" in lines[0]
    assert re.fullmatch(r"storage postgresql://u@db/x reachable again after \d+ s", lines[1])


@pytest.mark.parametrize("error", [
    sql.IntegrityError("insert", {}, Exception("duplicate key value violates unique constraint")),
    optuna.exceptions.StorageInternalError("bad data"),
    ValueError("something else"),
    OSError(errno.EACCES, "Permission denied"),
])
def test_other_failures_raise_at_once(error, capsys):
    inner = Flaky(failures=1, error=error)
    with pytest.raises(type(error)):
        OutageTolerantStorage(inner, "s", grace_s=30).get_all_studies()
    assert inner.calls == 1 and capsys.readouterr().err == ""


def test_an_integrity_error_inside_optunas_wrapper_is_not_retried():
    try:
        try:
            raise sql.IntegrityError("insert", {}, Exception("duplicate key"))
        except sql.IntegrityError as cause:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cause
    except optuna.exceptions.StorageInternalError as wrapped:
        assert not is_transient(wrapped)
    try:
        try:
            raise REFUSED
        except sql.OperationalError as cause:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cause
    except optuna.exceptions.StorageInternalError as wrapped:
        assert is_transient(wrapped)  # Optuna's misleading wrapper around a refused connection


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.ENOENT])
def test_a_shared_filesystem_away_is_an_outage_too(code):
    inner = Flaky(failures=2, error=OSError(code, os.strerror(code)))
    assert OutageTolerantStorage(inner, "studies/s/journal.log", grace_s=30).get_all_studies() == []


def test_past_the_grace_the_call_gives_up_in_one_line():
    inner = Flaky(failures=10**6)
    started = time.monotonic()
    with pytest.raises(StorageUnreachable) as unreachable:
        OutageTolerantStorage(inner, "postgresql://u@db/x", grace_s=0.3).get_all_studies()
    assert 0.3 <= time.monotonic() - started < 5
    message = str(unreachable.value)
    assert message.startswith("storage postgresql://u@db/x unreachable for 0 s (OperationalError:")
    assert "Connection refused); run the same command again" in message
    assert "\n" not in message and "run the same command again" in message


def test_threads_and_storages_of_one_process_say_it_once(capsys):
    storages = [OutageTolerantStorage(Flaky(failures=5), "db", grace_s=30) for _ in range(3)]
    threads = [threading.Thread(target=s.get_all_studies) for s in storages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = capsys.readouterr().err.splitlines()
    assert sum("unreachable" in line for line in lines) == 1 and sum("reachable again" in line for line in lines) == 1


def test_a_worker_waits_quietly(monkeypatch, capsys):
    monkeypatch.setattr(outages, "_ANNOUNCING", [])
    assert OutageTolerantStorage(Flaky(failures=2), "db", grace_s=30).get_all_studies() == []
    assert capsys.readouterr().err == ""


def test_a_study_runs_through_the_proxy():
    storage = OutageTolerantStorage(InMemoryStorage(), "memory", grace_s=30)
    study = optuna.create_study(storage=storage, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    assert len(study.get_trials()) == 3 and study.best_value <= 1


class TwoOutages(InMemoryStorage):
    """Unreachable for 0.35 s, back for 0.2 s, unreachable again for 0.35 s."""

    def __init__(self):
        super().__init__()
        self.began = time.monotonic()

    def get_all_studies(self):
        since = time.monotonic() - self.began
        if since < 0.35 or 0.55 <= since < 0.9:
            raise REFUSED
        return super().get_all_studies()


def test_a_storage_back_between_two_outages_is_seen_to_be():
    """Each outage is shorter than the grace, their span is not: the waits between attempts
    (a tenth of the grace at most) see the storage back in between, so nothing gives up."""
    storage = OutageTolerantStorage(TwoOutages(), "db", grace_s=0.8)
    while time.monotonic() - storage.inner.began < 1.0:
        assert storage.get_all_studies() == []


class LostAcknowledgement(InMemoryStorage):
    """Its next ``set_trial_state_values`` after ``break_next`` commits, then the connection breaks."""

    def __init__(self):
        super().__init__()
        self.break_next = True

    def set_trial_state_values(self, trial_id, state, values=None):
        changed = super().set_trial_state_values(trial_id, state, values)
        if self.break_next:
            self.break_next = False
            raise REFUSED
        return changed


def test_a_finish_whose_commit_beat_the_break_counts_as_done(tmp_path):
    storage = OutageTolerantStorage(LostAcknowledgement(), "memory", grace_s=30)
    study = optuna.create_study(storage=storage, direction="maximize")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    trial = study.ask(x)
    storage.inner.break_next = True
    study.tell(trial, 0.5)  # without the check the retry fails: "already finished"
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE and study.best_value == 0.5
    # the coordinator failing a lost trial over such a break still adds its retry
    lost = study.ask(x)
    storage.inner.break_next = True
    assert retry_lost_trial(study, study.trials[lost.number], "worker gone", max_retries=3, lock=tmp_path / "ask.lock")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert study.trials[2].user_attrs[RETRY_OF_ATTR] == lost.number
    # taking a WAITING trial is never guessed: a RUNNING trial found on the retry may be another
    # worker's, so the call reports that it did not take it (the heartbeats sort it out)
    storage.inner.break_next = True
    assert storage.set_trial_state_values(study.trials[2]._trial_id, optuna.trial.TrialState.RUNNING) is False


# ---- a real PostgreSQL server stopped during a search --------------------------------------

def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _epochs_all_reported(study: optuna.Study) -> None:
    """Every epoch a trial's run folder trained is in the storage, once, as the trial's value for it."""
    for trial in study.get_trials():
        if trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            rows = RunFolder(trial.user_attrs["run_dir"]).epoch_rows()
            assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1)), trial.number  # none twice
            assert {int(r["epoch"]): float(r["val_r1_mean"]) for r in rows} == trial.intermediate_values, trial.number


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.recovery
@pytest.mark.parametrize("workers", [1, 2])
def test_a_search_rides_out_a_database_stopped_for_30_seconds(tmp_path, postgres_server, postgres_url, workers):
    name = f"outage-{workers}"
    args = [*search_args(tmp_path, "baseline", 10, "--storage", postgres_url, "--study", name, "--pruner", "none"),
            "--workers", str(workers)]
    process = subprocess.Popen([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    drawn = random.Random(workers).randint(2, 6)  # trials finished when the database goes away
    try:
        assert wait_for(lambda: process.poll() is None and _finished(postgres_url, name) >= drawn, timeout=300)
        postgres_server.stop()
        time.sleep(30)
    finally:
        postgres_server.start()
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("unreachable (") == 1 and err.count("reachable again after") == 1, err
    study = _study(postgres_url, name)
    assert count_trials(study).complete == 10 and count_trials(study).running == 0
    _epochs_all_reported(study)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.recovery
def test_an_outage_past_the_grace_is_one_line_and_the_same_command_finishes(tmp_path, postgres_server, postgres_url):
    name = "outage-long"
    args = [*search_args(tmp_path, "baseline", 4, "--storage", postgres_url, "--study", name, "--pruner", "none",
                         "--epochs", "3", "--shapes-train-images", "200"), "--storage-grace", "5"]
    process = subprocess.Popen([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: process.poll() is None and _finished(postgres_url, name) >= 1, timeout=300)
        postgres_server.stop()
        out, err = process.communicate(timeout=120)
    finally:
        postgres_server.start()
    assert process.returncode == 75, err
    last = err.strip().splitlines()[-1]
    assert re.match(rf"error: storage {re.escape(postgres_url)} unreachable for \d+ s \(", last), err
    assert "Traceback" not in err
    again = subprocess.run([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path, text=True,
                           capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr
    study = _study(postgres_url, name)
    assert count_trials(study).complete == 4 and count_trials(study).running == 0
    _epochs_all_reported(study)


def _finished(url: str, name: str) -> int:
    try:
        return count_trials(_study(url, name)).finished
    except KeyError:  # the study is not created yet
        return 0
