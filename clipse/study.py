"""Optuna studies: storage, the settings a study keeps, counting, heartbeats and lost trials.

Storage: ``--storage`` takes an Optuna RDB URL (``sqlite:///...``, ``postgresql://...``) or a
plain file path, which means a journal file (optuna-dashboard's convention). The embedded
default is the journal file ``studies/<study>/journal.log``: several processes can write it at
once without "database is locked", optuna-dashboard opens it, and on a shared filesystem SLURM
jobs on many nodes can use it too. Use PostgreSQL when many workers hammer one study.

Lost trials: a worker that dies (killed, preempted, out of memory) stops beating its heartbeat
(a trial system attribute, refreshed every few seconds, so it works on every storage). A sweep
fails such trials and enqueues a retry with the same parameters that resumes the dead trial's
run folder from its last checkpoint. A trial on this host whose process is gone is lost at once.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from clipse.config import SELECT_METRICS
from clipse.errors import UserError

SETTINGS_ATTR = "clipse:settings"
OWNER_ATTR = "clipse:owner"          # {"host", "pid", "session", "slurm_job"} of the running worker
HEARTBEAT_ATTR = "clipse:heartbeat"  # time.time() of the last beat
RETRIED_ATTR = "clipse:retried"      # a failed trial whose work a retry took over (not counted)
LOST_ATTR = "clipse:lost"            # why a running trial was declared lost
HEARTBEAT_INTERVAL_S = 10.0
DEFAULT_GRACE_S = 120.0
SLURM_GRACE_S = 600.0
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "hyperband", "none")

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class StudySettings:
    """What a study is: fixed when it is created and reused on every resume (study user attrs)."""

    space: str
    space_digest: str
    space_definition: dict[str, Any]  # workers sample from this, not from the file
    metric: str = "val_r1_mean"
    sampler: str = "tpe"
    seed: int | None = None
    startup_trials: int = 10
    pruner: str = "median"
    base: dict[str, Any] = field(default_factory=dict)  # training settings given on the command line

    def build_sampler(self, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
        """Each worker builds a fresh sampler per trial, so its seed moves with the number of
        trials already in the study: reproducible for one in-process worker, and never the
        same random draw twice."""
        seed = None if self.seed is None else self.seed * 1_000_003 + trials_so_far
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # set explicitly: multivariate TPE models parameter interactions; the constant liar
        # keeps parallel workers from sampling the same point while trials are running
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=self.startup_trials)

    def build_pruner(self, epochs: int) -> optuna.pruners.BasePruner:
        if self.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
        if self.pruner == "percentile":
            return optuna.pruners.PercentilePruner(33.0, n_startup_trials=5, n_warmup_steps=1)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
        return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------------------------
# storage


def storage_url(study_dir: Path, storage: str | None) -> str:
    """The storage string users and optuna-dashboard see (default: the study's journal file)."""
    return storage or str(study_dir / "journal.log")


def is_rdb_url(storage: str) -> bool:
    return "://" in storage


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    try:
        if is_rdb_url(storage):
            kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {"pool_pre_ping": True}
            return optuna.storages.RDBStorage(storage, engine_kwargs=kwargs)
        path = Path(storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except (ImportError, ModuleNotFoundError) as exc:
        raise UserError(f"storage {storage}: a driver is missing ({exc}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except Exception as exc:  # sqlalchemy / OS errors: unreachable server, bad URL, no permission
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"storage {storage}: cannot open ({first_line})") from None


def study_names(backend: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)]


def create_or_load(name: str, backend: optuna.storages.BaseStorage, settings: StudySettings,
                   epochs: int) -> optuna.Study:
    """Create the study with ``settings`` or load it; a loaded study keeps its own settings."""
    study = optuna.create_study(study_name=name, storage=backend, direction="maximize", load_if_exists=True,
                                sampler=settings.build_sampler(), pruner=settings.build_pruner(epochs))
    if SETTINGS_ATTR not in study.user_attrs:
        study.set_user_attr(SETTINGS_ATTR, asdict(settings))
    return study


def stored_settings(study: optuna.Study) -> StudySettings:
    try:
        return StudySettings(**study.user_attrs[SETTINGS_ATTR])
    except (KeyError, TypeError):
        raise UserError(f"study '{study.study_name}' was not made by this version of clipse "
                        "(its stored settings do not match); use a new --study") from None


def load_study(name: str, storage: str) -> optuna.Study:
    """An existing study, with the sampler and pruner its stored settings describe."""
    backend = open_storage(storage)
    try:
        plain = optuna.load_study(study_name=name, storage=backend)
    except KeyError:
        raise UserError(f"no study '{name}' in {storage}") from None
    if SETTINGS_ATTR not in plain.user_attrs:
        raise UserError(f"study '{name}' in {storage} was not made by clipse (no stored settings)")
    settings = stored_settings(plain)
    epochs = int(settings.base.get("epochs", 0)) or _default_epochs()
    trials_so_far = len(plain.get_trials(deepcopy=False))
    return optuna.load_study(study_name=name, storage=backend, sampler=settings.build_sampler(trials_so_far),
                             pruner=settings.build_pruner(epochs))


def _default_epochs() -> int:
    from clipse.config import TrainConfig

    return TrainConfig().epochs


def check_metric(metric: str) -> str:
    if metric not in SELECT_METRICS:
        raise UserError(f"unknown metric '{metric}' (choose from {', '.join(SELECT_METRICS)})")
    return metric


# ----------------------------------------------------------------------------------------------
# counting towards the study's total


@dataclass
class TrialCounts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0          # failures that count (not replaced by a retry)
    running: int = 0
    running_elsewhere: int = 0  # RUNNING trials whose worker belongs to another session
    waiting: int = 0
    best_value: float | None = None
    best_number: int | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def count_trials(study: optuna.Study, session: str | None = None) -> TrialCounts:
    counts = TrialCounts()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            counts.complete += 1
            if counts.best_value is None or t.value > counts.best_value:
                counts.best_value, counts.best_number = t.value, t.number
        elif t.state == TrialState.PRUNED:
            counts.pruned += 1
        elif t.state == TrialState.FAIL and not t.system_attrs.get(RETRIED_ATTR):
            counts.failed += 1
        elif t.state == TrialState.RUNNING:
            counts.running += 1
            owner = t.system_attrs.get(OWNER_ATTR)
            if session is not None and owner is not None and owner.get("session") != session:
                counts.running_elsewhere += 1
        elif t.state == TrialState.WAITING:
            counts.waiting += 1
    return counts


# ----------------------------------------------------------------------------------------------
# heartbeats and lost trials


def owner_record(session: str) -> dict[str, Any]:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"host": platform.node(), "pid": os.getpid(), "session": session, "slurm_job": job}


class Heartbeat:
    """Refreshes the trial's heartbeat attribute from a background thread while it runs."""

    def __init__(self, study: optuna.Study, trial_id: int, interval_s: float = HEARTBEAT_INTERVAL_S):
        self._storage, self._trial_id, self._interval = study._storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipse-heartbeat", daemon=True)

    def _beat(self) -> None:
        self._storage.set_trial_system_attr(self._trial_id, HEARTBEAT_ATTR, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception:  # a finished trial or a passing storage hiccup: the next beat retries
                pass

    def __enter__(self) -> "Heartbeat":
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lost_reason(trial: optuna.trial.FrozenTrial, grace_s: float, dead_jobs: set[str], now: float) -> str | None:
    """Why this RUNNING trial's worker is gone, or None while it may still be alive."""
    owner = trial.system_attrs.get(OWNER_ATTR)
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if owner is None:  # asked but not yet claimed: judge by age
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return f"no worker claimed it for {now - started:.0f} s" if now - started > grace_s else None
    if owner.get("slurm_job") and owner["slurm_job"] in dead_jobs:
        return f"SLURM job {owner['slurm_job']} ended"
    if owner.get("host") == platform.node() and not owner.get("slurm_job") and not _process_alive(owner["pid"]):
        return f"worker process {owner['pid']} on {owner['host']} is gone"
    if beat is not None and now - beat > grace_s:
        return f"no heartbeat for {now - beat:.0f} s"
    return None


def retry_lost_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, max_retries: int) -> bool:
    """Fail a lost trial and enqueue a retry with the same parameters that resumes its run
    folder. Safe when several sweepers race: only the one whose FAIL lands enqueues."""
    storage = study._storage
    attempt = int(trial.user_attrs.get("attempt", 1))
    will_retry = attempt <= max_retries and bool(trial.params)
    try:
        storage.set_trial_system_attr(trial._trial_id, LOST_ATTR, reason)
        storage.set_trial_system_attr(trial._trial_id, RETRIED_ATTR, will_retry)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except Exception:  # already finished by its worker or by another sweeper
        return False
    if will_retry:
        attrs = {"retry_of": trial.number, "attempt": attempt + 1}
        if "run_dir" in trial.user_attrs:
            attrs["run_dir"] = trial.user_attrs["run_dir"]
        study.enqueue_trial(trial.params, user_attrs=attrs)
    return True


def sweep_lost_trials(study: optuna.Study, *, grace_s: float = DEFAULT_GRACE_S, dead_jobs: set[str] | None = None,
                      max_retries: int = 2, session: str | None = None, everything_of_session: bool = False) -> list[int]:
    """Fail and retry RUNNING trials whose worker is gone; returns their numbers.

    ``everything_of_session``: the caller knows all of its session's workers have stopped
    (after Ctrl-C or a cancel), so its running trials are lost whatever their heartbeat says.
    """
    now = time.time()
    swept = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_ATTR) or {}
        if everything_of_session and owner.get("session") == session:
            reason = "its worker was stopped (interrupted or cancelled)"
        else:
            reason = lost_reason(trial, grace_s, dead_jobs or set(), now)
        if reason and retry_lost_trial(study, trial, reason, max_retries):
            swept.append(trial.number)
    return swept

