"""Optuna studies: storage, the settings a study keeps, counting, heartbeats and lost trials.

Storage: an Optuna RDB URL (``sqlite:///...``, ``postgresql://...``) or a plain file path,
which means a journal file (optuna-dashboard's convention). The default is the journal file
``studies/<study>/journal.log``: several processes can write it at once without "database is
locked", optuna-dashboard opens it, on a shared filesystem SLURM jobs on many nodes can use it
too, and a crash mid-write cannot destroy it (``clipse.journal``). A password in a PostgreSQL
URL is taken out of the URL at once (``secure_storage``) and handed to workers through
``PGPASSWORD``, so it is never printed or written to a file.

Lost trials: a worker that dies (killed, preempted, out of memory) stops beating its heartbeat
(a trial attribute refreshed every few seconds, so it works on every storage). A sweep fails
such trials and adds a retry with the same parameters and the epochs already reported, which
resumes the dead trial's run folder from its last checkpoint. Whether a worker is gone before
its heartbeat goes stale is for the executor to say (a local process that exited, a SLURM job
that ended).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from clipse.config import TrainConfig
from clipse.evaluation.metrics import RANK_RULE
from clipse.search.journal import open_journal
from clipse.search.outages import STORAGE_GRACE_S, OutageTolerantStorage, ride_out
from clipse.search.samplers import build_sampler
from clipse.search.spaces import SearchSpace
from clipse.util.errors import StorageUnreachable, UserError
from clipse.util.locks import exclusive_lock

SETTINGS_ATTR = "clipse:settings"    # study user attr: StudySettings
OWNER_ATTR = "clipse:owner"          # trial user attr: identity of the worker running it, and its session
HEARTBEAT_ATTR = "clipse:heartbeat"  # trial user attr: time.time() of the last beat
LOST_ATTR = "clipse:lost"            # trial system attr: why a running trial was declared lost
RETRY_OF_ATTR = "retry_of"           # trial user attr of a retry: the number of the lost trial it continues
ATTEMPT_ATTR = "attempt"             # trial user attr: 1 for a first try, 2 for its first retry, ...
RUN_DIR_ATTR = "run_dir"             # trial user attr: the trial's run folder (a retry resumes it)
WEIGHT_CONSTRAINT = "weight_std_shortfall"  # trial constraint (Optuna's): set when min_weight_std > 0
ZEROSHOT_CONSTRAINT = "zeroshot_drop_excess"  # trial constraint: set when max_zeroshot_drop is given
HEARTBEAT_INTERVAL_S = 10.0
PRUNERS = ("median", "percentile", "hyperband", "none")

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class StudySettings:
    """What a study is: fixed when it is created and reused on every resume (study user attrs).
    The defaults here are the search's defaults."""

    space: str
    space_digest: str
    space_definition: dict[str, Any]  # workers sample from this, not from the file
    metric: str = TrainConfig.__dataclass_fields__["select_metric"].default
    sampler: str = "tpe"
    seed: int = 0
    startup_trials: int = 10
    pruner: str = "median"
    min_weight_std: float = 0.0  # completed trials whose SANW weights spread less are infeasible (0: off)
    seeds_per_trial: int = 1     # training seeds of every trial; its value is their mean
    max_zeroshot_drop: float | None = None  # completed trials that forget more zero-shot top-1 (points) are infeasible
    base: dict[str, Any] = field(default_factory=dict)  # training settings given on the command line
    rank_rule: str = RANK_RULE   # how its values were scored (studies of clipse 0.1 have none: strict ranks)

    def base_config(self) -> TrainConfig:
        """The training configuration every trial starts from (before the space's values)."""
        return TrainConfig.from_mapping(self.base, f"study settings ({self.space})")

    @property
    def metrics(self) -> list[str]:
        """The objectives: one metric, or several for a multi-objective study (all maximised)."""
        return self.metric.split(",")

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def build_sampler(self, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
        """Each worker builds a fresh sampler per trial (``clipse.search.samplers``)."""
        return build_sampler(self.sampler, self.seed, self.startup_trials, SearchSpace.from_dict(self.space_definition),
                             trials_so_far)

    def weight_shortfall(self, spread: float | None) -> float:
        """The trial's constraint value (``WEIGHT_CONSTRAINT``; feasible when <= 0): how far its
        last-epoch weight spread falls short of ``min_weight_std``. None: logged no weights."""
        return self.min_weight_std - (spread if spread is not None and math.isfinite(spread) else 0.0)

    def zeroshot_excess(self, start_top1: float | None, best_top1: float | None) -> float:
        """The trial's ``ZEROSHOT_CONSTRAINT`` value (feasible when <= 0): how many points of
        zero-shot top-1 its checkpoint lost beyond ``max_zeroshot_drop``, against the starting
        model. A trial that measured none is infeasible (100, whatever the maximum)."""
        measured = all(v is not None and math.isfinite(v) for v in (start_top1, best_top1))
        return 100.0 * (start_top1 - best_top1) - self.max_zeroshot_drop if measured else 100.0

    def build_pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
        if self.pruner == "percentile":
            return optuna.pruners.PercentilePruner(33.0, n_startup_trials=5, n_warmup_steps=1)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=self.base_config().epochs,
                                                  reduction_factor=3)
        return optuna.pruners.NopPruner()


def default_of_setting(name: str) -> Any:
    return StudySettings.__dataclass_fields__[name].default


# ----------------------------------------------------------------------------------------------
# storage


def is_rdb_url(storage: str) -> bool:
    return "://" in storage


# Drivers that connect through libpq, which reads PGPASSWORD and ~/.pgpass.
LIBPQ_DRIVERS = ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")


@contextlib.contextmanager
def secure_storage(storage: str) -> Iterator[str]:
    """The storage string without its password, which moves to ``PGPASSWORD`` while the block
    runs: this process and the workers it starts (local processes and SLURM jobs inherit the
    environment) connect with it, and nothing prints or writes it. The previous value of
    ``PGPASSWORD`` is restored afterwards."""
    if not is_rdb_url(storage):
        yield storage
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
        password = url.password or url.query.get("password")
    except (ArgumentError, ValueError):
        raise UserError("--storage: not a valid database URL") from None
    if password is None:
        yield storage
        return
    if url.drivername not in LIBPQ_DRIVERS:
        raise UserError(f"--storage: a password in a {url.drivername} URL would be written to job files and logs; "
                        "keep it out of the URL (PostgreSQL through libpq: PGPASSWORD or ~/.pgpass)")
    previous = os.environ.get("PGPASSWORD")
    os.environ["PGPASSWORD"] = str(password)
    try:
        yield url._replace(password=None, query={k: v for k, v in url.query.items() if k != "password"}
                           ).render_as_string(hide_password=False)
    finally:
        if previous is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = previous


def open_storage(storage: str, grace_s: float = STORAGE_GRACE_S, wait: bool = False) -> optuna.storages.BaseStorage:
    """The storage ``storage`` names (an RDB URL without its password, or a journal file); its
    calls ride out outages shorter than ``grace_s`` (``clipse.search.outages``). Opening it must
    succeed at once (a typo in a URL is one line, not a wait) unless ``wait``, as for a worker
    joining a study whose storage is away for a moment."""
    def inner() -> optuna.storages.BaseStorage:
        if is_rdb_url(storage):
            kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {"pool_pre_ping": True}
            return optuna.storages.RDBStorage(storage, engine_kwargs=kwargs)
        return optuna.storages.JournalStorage(open_journal(Path(storage)))

    try:
        return OutageTolerantStorage(ride_out(inner, storage, grace_s) if wait else inner(), storage, grace_s)
    except (UserError, StorageUnreachable):
        raise
    except (ImportError, ModuleNotFoundError) as exc:
        raise UserError(f"storage {storage}: a driver is missing ({exc}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except Exception as exc:  # sqlalchemy / OS errors: unreachable server, bad URL, no permission
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = os.environ.get("PGPASSWORD")
        if password:
            first_line = first_line.replace(password, "***")
        raise UserError(f"storage {storage}: cannot open ({first_line})") from None


def study_names(backend: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)]


def create_or_load(name: str, backend: optuna.storages.BaseStorage, settings: StudySettings) -> optuna.Study:
    """Create the study with ``settings`` or load it; a loaded study keeps its own settings."""
    study = optuna.create_study(study_name=name, storage=backend, directions=["maximize"] * len(settings.metrics),
                                load_if_exists=True,
                                sampler=settings.build_sampler(), pruner=settings.build_pruner())
    if SETTINGS_ATTR not in study.user_attrs:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(settings.metrics)  # shown by optuna-dashboard and Optuna's plots
        study.set_user_attr(SETTINGS_ATTR, asdict(settings))
    return study


def stored_settings(study: optuna.Study) -> StudySettings:
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if isinstance(stored, dict) and "space" in stored and stored.get("rank_rule") != RANK_RULE:
        raise UserError(f"study '{study.study_name}' was made by clipse 0.1, whose ranks counted ties for the relevant "
                        "item; its values do not compare with this version's: start a new study (--study NAME), or "
                        "finish it with clipse 0.1 (CHANGELOG.md)")
    try:
        return StudySettings(**stored)
    except TypeError:
        raise UserError(f"study '{study.study_name}' was not made by this version of clipse "
                        "(its stored settings do not match); use a new --study") from None


def load_study(name: str, storage: str, grace_s: float = STORAGE_GRACE_S) -> optuna.Study:
    """An existing study, with the sampler and pruner its stored settings describe."""
    backend = open_storage(storage, grace_s, wait=True)
    try:
        plain = optuna.load_study(study_name=name, storage=backend)
    except KeyError:
        raise UserError(f"no study '{name}' in {storage}") from None
    if SETTINGS_ATTR not in plain.user_attrs:
        raise UserError(f"study '{name}' in {storage} was not made by clipse (no stored settings)")
    settings = stored_settings(plain)
    trials_so_far = len(plain.get_trials(deepcopy=False))
    return optuna.load_study(study_name=name, storage=backend, sampler=settings.build_sampler(trials_so_far),
                             pruner=settings.build_pruner())


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed feasible trials (``is_feasible``), best first. With several objectives, only
    their Pareto front, ordered by the mean of the objectives (the front has no order of its own)."""
    candidates = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    if len(study.directions) > 1:
        return sorted(pareto_front(candidates), key=lambda t: (-sum(t.values) / len(t.values), t.number))
    return sorted(candidates, key=lambda t: (-t.value, t.number))


def trial_settings(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """What the search chose for a trial: the space's fixed settings and the sampled ones."""
    space = SearchSpace.from_dict(stored_settings(study).space_definition)
    return {**space.fixed, **trial.params}


def is_feasible(trial: FrozenTrial) -> bool:
    """Optuna's rule: every constraint the trial set is <= 0 (a trial without one is feasible)."""
    return all(value <= 0 for value in trial.constraints.values())


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other trial dominates (every objective maximised)."""
    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        return all(x >= y for x, y in zip(a.values, b.values)) and a.values != b.values

    return [t for t in trials if not any(dominates(other, t) for other in trials)]


# ----------------------------------------------------------------------------------------------
# counting towards the study's total


@dataclass
class TrialCounts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0          # failures that count (not continued by a retry)
    running: int = 0
    running_elsewhere: int = 0  # RUNNING trials whose worker belongs to another session
    waiting: int = 0
    infeasible: int = 0      # completed trials whose SANW weights spread less than the study's minimum
    best_value: float | None = None
    best_number: int | None = None
    front: int = 0           # multi-objective studies: trials on the Pareto front (best_value stays None)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials whose work a retry took over."""
    return {t.user_attrs[RETRY_OF_ATTR] for t in trials if RETRY_OF_ATTR in t.user_attrs}


def count_trials(study: optuna.Study, session: str | None = None) -> TrialCounts:
    counts = TrialCounts()
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts.complete += 1
            if not is_feasible(t):
                counts.infeasible += 1
            elif len(t.values) == 1 and (counts.best_value is None or t.value > counts.best_value):
                counts.best_value, counts.best_number = t.value, t.number
        elif t.state == TrialState.PRUNED:
            counts.pruned += 1
        elif t.state == TrialState.FAIL and t.number not in retried:
            counts.failed += 1
        elif t.state == TrialState.RUNNING:
            counts.running += 1
            owner = t.user_attrs.get(OWNER_ATTR)
            if session is not None and owner is not None and owner.get("session") != session:
                counts.running_elsewhere += 1
        elif t.state == TrialState.WAITING:
            counts.waiting += 1
    if len(study.directions) > 1:
        counts.front = len(pareto_front([t for t in trials if t.state == TrialState.COMPLETE and is_feasible(t)]))
    return counts


def take_trial(study: optuna.Study, total: int | None, lock: Path,
               sampler_for: Callable[[int], optuna.samplers.BaseSampler]) -> optuna.Trial | None:
    """A queued trial (a retry, an enqueued point) if there is one, else a new one while the study
    is short of ``total``; None when it has every trial it needs. Workers check and ask under
    ``lock``: two that both saw one trial missing would otherwise both create one, and the
    surplus trial could complete the study while a retry was still queued, leaving it WAITING.
    The sampler is built there too (``sampler_for(trials so far)``, ``StudySettings.build_sampler``):
    two workers that loaded the study at the same moment would otherwise draw with the same seed
    and ask for the same parameters."""
    with exclusive_lock(lock):
        counts = count_trials(study)
        if total is not None and not counts.waiting and counts.finished + counts.running >= total:
            return None
        study.sampler = sampler_for(len(study.get_trials(deepcopy=False)))
        return study.ask()


# ----------------------------------------------------------------------------------------------
# heartbeats and lost trials


class Heartbeat:
    """Refreshes the trial's heartbeat attribute from a background thread while it runs.
    (Optuna's own heartbeat exists only for RDB storages; this one works on journals too.)"""

    def __init__(self, trial: optuna.Trial, interval_s: float = HEARTBEAT_INTERVAL_S):
        self._trial, self._interval = trial, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipse-heartbeat", daemon=True)

    def _beat(self) -> None:
        self._trial.set_user_attr(HEARTBEAT_ATTR, time.time())

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


WorkerGone = Callable[[dict[str, Any]], "str | None"]


def lost_reason(trial: FrozenTrial, grace_s: float, worker_gone: WorkerGone, now: float) -> str | None:
    """Why this RUNNING trial's worker is gone, or None while it may still be alive."""
    owner = trial.user_attrs.get(OWNER_ATTR)
    if owner is None:  # asked but not yet claimed: judge by age
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return f"no worker claimed it for {now - started:.0f} s" if now - started > grace_s else None
    reason = worker_gone(owner)
    if reason:
        return reason
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if beat is not None and now - beat > grace_s:
        return f"no heartbeat for {now - beat:.0f} s"
    return None


def retry_lost_trial(study: optuna.Study, trial: FrozenTrial, reason: str, max_retries: int, lock: Path) -> bool:
    """Fail a lost trial and, within ``max_retries``, add a retry with the same parameters,
    reported epochs and sampler state (the grid point it stands for, a CMA-ES generation) that
    resumes its run folder. A trial lost before it drew its parameters (its worker killed
    between taking it and starting, a window a storage outage stretches) trained nothing: its
    retry draws parameters of its own, so the search still reaches its total. Safe when several
    sweepers race: only the one whose FAIL lands adds the retry. Both writes happen under
    ``lock`` (the study's ask lock), so a FAIL without its retry seen under the lock was left by
    a process stopped between them (``retry_orphaned_losses``). Returns whether this call failed the trial."""
    with exclusive_lock(lock):
        try:
            _mark_lost(study, trial, reason)
            study.tell(trial.number, state=TrialState.FAIL)
        except Exception:  # already finished by its worker or by another sweeper, or by this call
            if not _failed_here(study, trial, reason):
                return False
        _add_retry(study, trial, max_retries)
    return True


def retry_orphaned_losses(study: optuna.Study, max_retries: int, lock: Path) -> list[int]:
    """Add the retry a lost trial never got: the process that failed it was killed, interrupted
    or out of storage grace between the FAIL and the retry. Returns the trials given one."""
    def orphans(trials: list[FrozenTrial]) -> list[FrozenTrial]:
        retried = retried_numbers(trials)
        return [t for t in trials if t.state == TrialState.FAIL and LOST_ATTR in t.system_attrs
                and "error" not in t.user_attrs and t.number not in retried and _retry_left(t, max_retries)]

    if not orphans(study.get_trials(deepcopy=False)):
        return []
    with exclusive_lock(lock):  # no sweeper is between its two writes now
        found = orphans(study.get_trials(deepcopy=False))
        for trial in found:
            _add_retry(study, trial, max_retries)
    return [t.number for t in found]


def _retry_left(trial: FrozenTrial, max_retries: int) -> bool:
    return int(trial.user_attrs.get(ATTEMPT_ATTR, 1)) <= max_retries


def _add_retry(study: optuna.Study, trial: FrozenTrial, max_retries: int) -> None:
    if _retry_left(trial, max_retries):
        attrs = {RETRY_OF_ATTR: trial.number, ATTEMPT_ATTR: int(trial.user_attrs.get(ATTEMPT_ATTR, 1)) + 1}
        if RUN_DIR_ATTR in trial.user_attrs:
            attrs[RUN_DIR_ATTR] = trial.user_attrs[RUN_DIR_ATTR]
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, user_attrs=attrs,
            system_attrs={k: v for k, v in trial.system_attrs.items() if k != LOST_ATTR},
            intermediate_values=trial.intermediate_values))


def _failed_here(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Whether the FAIL that made ``tell`` refuse was this sweep's own: a connection that broke
    after the write committed is retried (``clipse.search.outages``) and then finds the trial
    finished. It was when the trial failed as lost for this reason, with no error of its own
    run (a worker that fails its trial records one) and no retry yet."""
    now = study._storage.get_trial(trial._trial_id)
    return (now.state == TrialState.FAIL and now.system_attrs.get(LOST_ATTR) == reason and "error" not in now.user_attrs
            and trial.number not in retried_numbers(study.get_trials(deepcopy=False)))


def sweep_lost_trials(study: optuna.Study, *, grace_s: float, worker_gone: WorkerGone, max_retries: int,
                      lock: Path) -> list[int]:
    """Fail and retry RUNNING trials whose worker is gone; returns their numbers."""
    now = time.time()
    swept = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = lost_reason(trial, grace_s, worker_gone, now)
        if reason and retry_lost_trial(study, trial, reason, max_retries, lock):
            swept.append(trial.number)
    return swept


def sweep_session(study: optuna.Study, session: str, reason: str, max_retries: int, lock: Path) -> list[int]:
    """Fail and retry every RUNNING trial of ``session``, whose workers the caller knows have
    stopped (after Ctrl-C or a cancel), whatever their heartbeats say."""
    swept = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if (trial.user_attrs.get(OWNER_ATTR) or {}).get("session") == session:
            if retry_lost_trial(study, trial, reason, max_retries, lock):
                swept.append(trial.number)
    return swept


# ----------------------------------------------------------------------------------------------
# Where Optuna has no public API. Two things a worker or coordinator must do to a trial it did
# not create with study.ask(): write why it was declared lost (so the failed trial says so),
# and take back a RUNNING trial after its SLURM job was requeued. Both go through the storage.


def _mark_lost(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, LOST_ATTR, reason)


def take_back(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial:
    """A handle on a RUNNING trial this worker ran before it was restarted."""
    return optuna.Trial(study, trial._trial_id)
