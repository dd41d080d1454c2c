"""Hyperparameter search of a space with Optuna:

    python -m clipse.search --space bandpass --trials 50

or from Python, ``run_search(SearchOptions(space="bandpass", trials=50))``.

``--trials N`` is the study's total: running the same command again after a crash or Ctrl-C
finishes the remaining trials and repeats no finished one. The study's settings (space,
metric, sampler, seed, pruner, training settings given here) are stored with it when it is
created and reused on resume; giving a different value for one of them is an error.

The coordinator (this process) hands one task per trial to an executor and watches the
storage: it shows progress, sweeps trials whose worker died (failing them and adding a retry
with the same parameters that resumes from the dead trial's checkpoint) and replaces lost work.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from clipse.config import (
    DATA_KEYS,
    MODEL_KEYS,
    SELECT_METRICS,
    STUDY_TRACKING_KEYS,
    TrainConfig,
    add_config_arguments,
    add_tracking_arguments,
    config_overrides,
    read_yaml_document,
)
from clipse.executors import (
    BACKENDS,
    Executor,
    ExecutorOptions,
    Task,
    executor_from_options,
    for_training,
)
from clipse.executors.workload import Workload, run_workload
from clipse.search.confirm import confirm_best
from clipse.search.objective import StudyRef, TrialOutcome, run_trial_task
from clipse.search.outages import STORAGE_GRACE_S, announce_outages, recent_outage_s
from clipse.search.progress import ProgressLine
from clipse.search.samplers import SAMPLER_KINDS, SAMPLERS, check_sampler, grid_size
from clipse.search.spaces import (
    SearchSpace,
    available_spaces,
    check_min_weight_std,
    load_space,
)
from clipse.search.study import (
    PRUNERS,
    SETTINGS_ATTR,
    StudySettings,
    TrialCounts,
    count_trials,
    create_or_load,
    default_of_setting,
    open_storage,
    ranked_trials,
    retry_orphaned_losses,
    secure_storage,
    stored_settings,
    study_names,
    sweep_lost_trials,
    sweep_session,
)
from clipse.trackers.study_record import open_study_record
from clipse.training import build_embedded_model
from clipse.training.assembly import zeroshot_set_for
from clipse.util.errors import UserError, cli_main, configure_logging
from clipse.util.fields import add_arguments, check_at_least, from_arguments, setting
from clipse.util.locks import exclusive_lock
from clipse.util.paths import DEFAULT_STUDIES_DIR, StudyFolder
from clipse.util.tables import markdown_table

# Training settings a search may fix for all its trials (the space chooses the rest).
TRAINING_KEYS = (*DATA_KEYS, *MODEL_KEYS, "epochs", "batch_size", "device", "precision", "nproc", "micro_batch",
                 "affinity", "ema_decay", "caption_noise", "zeroshot_every")
# Settings stored with a study that a resumed search may only repeat, not change.
STUDY_KEYS = ("metric", "sampler", "startup_trials", "pruner", "seed", "min_weight_std", "seeds_per_trial",
              "max_zeroshot_drop")
MAX_TASK_ERRORS = 3


@dataclass
class SearchOptions:
    """Everything ``clipse.search`` takes; every field but ``training`` is a flag. Study
    settings left at None take the stored study's value, or for a new study the default."""

    space: str = setting(help="search space name (search_spaces/NAME.yaml) or a YAML path")
    trials: int = setting(help="total trials of the study (finished ones count)")
    study: str | None = setting(None, "study name", shown_default="the space's name")
    storage: str | None = setting(None, "Optuna RDB URL, or a journal file path",
                                  shown_default="studies/<study>/journal.log")
    studies_dir: Path = setting(DEFAULT_STUDIES_DIR, "where study folders live")
    seed: int | None = setting(None, "seed of the sampler and of every trial's training",
                               shown_default=default_of_setting("seed"))
    metric: str | None = setting(None, "objective: the best epoch's value of one metric, or several comma-separated "
                                 f"for a multi-objective study (of {', '.join(SELECT_METRICS)})",
                                 shown_default=default_of_setting("metric"))
    sampler: str | None = setting(None, "; ".join(f"{name}: {kind.help}" for name, kind in SAMPLER_KINDS.items()),
                                  choices=SAMPLERS, shown_default=default_of_setting("sampler"))
    startup_trials: int | None = setting(None, "random trials before TPE, GP or CMA-ES model the space",
                                         shown_default=default_of_setting("startup_trials"))
    pruner: str | None = setting(None, "stops poor trials early from their per-epoch curve (off for several "
                                 "objectives)", choices=PRUNERS, shown_default=default_of_setting("pruner"))
    min_weight_std: float | None = setting(
        None, "completed trials whose SANW weights spread less than this in their last epoch (the std of the "
        "negative weights) are infeasible (Optuna's trial constraints): never the best, and TPE, GP and NSGA-II "
        "sample away from them; 0 turns it off", shown_default="the space's min_weight_std, else 0")
    max_zeroshot_drop: float | None = setting(
        None, "completed trials whose best checkpoint lost more than this many points of zero-shot top-1 (--zeroshot) "
        "against the starting model are infeasible, as with --min-weight-std", shown_default="off")
    seeds_per_trial: int | None = setting(
        None, "train every trial with this many seeds (the study's seed and the next ones), epoch by epoch; the "
        "pruner sees each epoch's mean over them and the trial's value is the mean of their best epochs",
        shown_default=default_of_setting("seeds_per_trial"))
    confirm_top: int = setting(0, "after the trials, train the K best again with --confirm-seeds further seeds; "
                               "the best mean over all its seeds is the confirmed best (clipse.final takes it)")
    confirm_seeds: int = setting(2, "seeds of each confirmation (--confirm-top)")
    enqueue: str | None = setting(None, "parameter sets the first trials use: a YAML file holding a list of mappings, "
                                  "or 'defaults' (the documented defaults of the space's settings); added once")
    heartbeat_grace: float | None = setting(
        None, "seconds without a heartbeat before a running trial counts as lost (workers known to have ended "
        "are noticed at once)", shown_default=", ".join(f"{name} {backend.heartbeat_grace_s:.0f}"
                                                        for name, backend in BACKENDS.items()))
    storage_grace: float = setting(STORAGE_GRACE_S, "seconds the study's storage may be unreachable (a database "
                                   "restarting or down, a shared filesystem away) before the search and its workers "
                                   "stop with exit status 75; shorter outages only pause them")
    execution: ExecutorOptions = setting(default_factory=ExecutorOptions, nested=True)
    # training settings fixed for every trial (keys as in YAML files: epochs, data_root, ...)
    training: dict[str, Any] = field(default_factory=dict)
    # experiment trackers of the trials (report_to, mlflow_uri, mlflow_experiment): not stored
    # with the study, so a resumed search may record elsewhere
    tracking: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchResult:
    study: str
    storage: str                 # as optuna-dashboard opens it (never with a password)
    study_dir: Path
    counts: TrialCounts
    metrics: list[str]           # the objective(s)
    total: int                   # the study's trial total (--trials, or the grid size when smaller)
    top: list[dict[str, Any]]    # the best completed trials, best first: trial, value (or each metric's value
                                 # with several objectives: the Pareto front), epochs, w_std, params
    confirmed: dict[str, Any] | None = None  # --confirm-top: clipse.search.confirm.CONFIRMED_ATTR's record
    interrupted: bool = False
    left_running: bool = False   # interrupted with --detach: the jobs (and their trials) run on

    @property
    def best(self) -> dict[str, Any] | None:
        return self.top[0] if self.top else None

    @property
    def dashboard_command(self) -> str:
        return dashboard_command(self.storage, StudyFolder(self.study_dir))


def dashboard_command(storage: str, folder: StudyFolder) -> str:
    """The optuna-dashboard command that opens the study with its artifacts (``storage`` without a password)."""
    return f"optuna-dashboard {shlex.quote(storage)} --artifact-dir {shlex.quote(str(folder.artifacts))}"


def resolve_settings(options: SearchOptions, existing: StudySettings | None, space: SearchSpace,
                     name: str) -> StudySettings:
    """The new study's settings, or the existing study's after checking the options agree."""
    given = {key: getattr(options, key) for key in STUDY_KEYS if getattr(options, key) is not None}
    if "metric" in given:
        given["metric"] = checked_metrics(given["metric"])
    base = dict(options.training)
    checked = TrainConfig.from_mapping({**base, **options.tracking}, "training settings").validate()
    if existing is None:
        check_zeroshot_use(TrainConfig.from_mapping(space.fixed, f"space {space.name}", base=checked),
                           given.get("metric", default_of_setting("metric")), given.get("max_zeroshot_drop"))
        objectives = len(given.get("metric", default_of_setting("metric")).split(","))
        if objectives > 1:
            if given.get("pruner", "none") != "none":
                raise UserError(f"--pruner {given['pruner']}: Optuna cannot prune a study of several objectives")
            given["pruner"] = "none"
        check_sampler(given.get("sampler", default_of_setting("sampler")), space, objectives)
        given.setdefault("min_weight_std", space.min_weight_std)
        seed = given.pop("seed", default_of_setting("seed"))
        return StudySettings(space=space.name, space_digest=space.digest, space_definition=space.to_dict(),
                             seed=seed, base={**base, "seed": seed}, **given)
    stored = asdict(existing)
    conflicts = [f"--{k.replace('_', '-')} {v} (study has {stored[k]})" for k, v in given.items() if stored[k] != v]
    conflicts += [f"--{k.replace('_', '-')} {v} (study has {existing.base.get(k, 'the default')})"
                  for k, v in base.items() if existing.base.get(k) != v]
    if existing.space != space.name:
        conflicts.append(f"--space {space.name} (study has {existing.space})")
    elif existing.space_digest != space.digest:
        raise UserError(f"search space {space.path} changed since the study was created; use a new --study")
    if conflicts:
        raise UserError(f"study '{name}' was created with other settings: {'; '.join(conflicts)}; "
                        "drop those flags or use a new --study")
    return existing


def check_zeroshot_use(config: TrainConfig, metric: str, max_drop: float | None) -> None:
    """A study that optimises or constrains zero-shot accuracy measures it at every epoch."""
    users = [f"--metric {metric}"] if "val_zs_top1" in metric.split(",") else []
    if max_drop is not None:
        users.append(f"--max-zeroshot-drop {max_drop:g}")
    if not users:
        return
    if config.zeroshot_source is None:
        raise UserError(f"{users[0]}: needs a zero-shot set (--zeroshot FOLDER_OR_CSV; shapes for the synthetic data)")
    if config.zeroshot_every != 1:
        raise UserError(f"{users[0]}: needs zero-shot accuracy at every epoch (--zeroshot-every 1, the default)")
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise UserError(f"--max-zeroshot-drop {max_drop:g}: points of top-1 accuracy, from 0 to 100")


def checked_metrics(text: str) -> str:
    """``--metric``: one metric or several, comma-separated, each a validation metric, none twice."""
    metrics = [m.strip() for m in text.split(",")]
    unknown = [m for m in metrics if m not in SELECT_METRICS]
    if unknown:
        raise UserError(f"--metric {unknown[0]!r}: not a validation metric (choose from {', '.join(SELECT_METRICS)})")
    if len(set(metrics)) != len(metrics):
        raise UserError(f"--metric {text}: names a metric twice")
    return ",".join(metrics)


def top_trials(study: optuna.Study, limit: int = 10) -> list[dict[str, Any]]:
    metrics = stored_settings(study).metrics
    values = (lambda t: dict(zip(metrics, t.values))) if len(metrics) > 1 else (lambda t: {"value": t.value})
    return [{"trial": t.number, **values(t), "epochs": t.user_attrs.get("epochs_done"),
             "w_std": t.user_attrs.get("weights_weight_std"), **t.params} for t in ranked_trials(study)[:limit]]


class TrialWorkload(Workload):
    """Keep exactly enough trial tasks out to reach the study's total; replace lost work."""

    def __init__(self, study: optuna.Study, ref: StudyRef, execution: ExecutorOptions, grace_s: float):
        self.study, self.ref, self.execution, self.grace_s = study, ref, execution, grace_s
        self.counts = TrialCounts()
        self.errors_in_a_row = 0
        self.allowed_errors = max(MAX_TASK_ERRORS, 2 * execution.workers)

    def sweep(self, executor: Executor) -> None:
        # after an outage, workers need as long again to get their heartbeats through
        grace = self.grace_s + recent_outage_s(self.ref.storage, self.grace_s)
        lock = self.ref.folder.ask_lock
        sweep_lost_trials(self.study, grace_s=grace, worker_gone=executor.worker_gone,
                          max_retries=self.execution.max_retries, lock=lock)
        retry_orphaned_losses(self.study, self.execution.max_retries, lock)
        self.counts = count_trials(self.study, self.ref.session)

    def wanted(self, room: int, outstanding: int) -> list[Task]:
        need = self.ref.total - self.counts.finished - self.counts.running_elsewhere - outstanding
        return [Task(run_trial_task, (self.ref, self.execution.max_retries), resources=self.execution.resources)
                for _ in range(min(need, room))]

    def finished(self, task: Task) -> None:
        if task.user_error:
            raise UserError(task.error)
        if isinstance(task.result, TrialOutcome):
            self.errors_in_a_row = 0
            return
        self.errors_in_a_row += 1  # lost work counts too: a job that cannot even report is a problem
        print(f"\nworker {task.state}: {task.error}", file=sys.stderr)
        if self.errors_in_a_row >= self.allowed_errors:
            raise UserError(f"workers cannot run trials ({self.errors_in_a_row} failures in a row): {task.error}")

    def complete(self) -> bool:
        return count_trials(self.study).finished >= self.ref.total

    def stopped(self, stopped: bool) -> None:
        """Leave none of this session's trials RUNNING: they are failed and queued again, so
        the next run resumes them from their checkpoints (unless the work runs on detached)."""
        if stopped:
            sweep_session(self.study, self.ref.session, "its worker was stopped (interrupted or cancelled)",
                          self.execution.max_retries, self.ref.folder.ask_lock)


def warm_start_points(space: SearchSpace, source: str, sampler: str) -> list[dict[str, Any]]:
    """The parameter sets ``--enqueue`` names, checked against the space (before anything is
    created, so a bad file leaves no study behind)."""
    if sampler == "grid":  # Optuna's grid sampler would train some point twice and skip another
        raise UserError("--enqueue: the grid sampler tries every point of the grid already; drop --enqueue")
    if source == "defaults":
        points = [space.defaults()]
    else:
        data = read_yaml_document(Path(source))
        if not isinstance(data, list):
            raise UserError(f"{source}: expected a YAML list of parameter sets")
        points = [space.check_point(point, f"{source}: item {i + 1}") for i, point in enumerate(data)]
    return [point for point in points if point]


def enqueue_points(study: optuna.Study, points: list[dict[str, Any]], total: int, lock: Path) -> int:
    """Queue the warm-start points the study does not hold yet, within its total; returns how
    many were added. A point a trial already used is skipped, so a resumed search enqueues
    nothing twice. Under the lock workers take trials by (``take_trial``), as another session's
    may be doing."""
    added = 0
    with exclusive_lock(lock):
        for point in points:
            counts = count_trials(study)
            if counts.finished + counts.running + counts.waiting >= total:
                break
            before = len(study.get_trials(deepcopy=False))
            study.enqueue_trial(point, skip_if_exists=True)
            added += len(study.get_trials(deepcopy=False)) - before
    return added


def run_search(options: SearchOptions) -> SearchResult:
    """Create or resume the study and run it to its total (see the module docstring). Progress
    goes to stderr. Ctrl-C stops the work and returns a result with ``interrupted`` set."""
    check_at_least(options, 1, "trials")
    if options.storage_grace <= 0:
        raise UserError("--storage-grace must be positive")
    if options.heartbeat_grace is not None and options.heartbeat_grace <= 0:
        raise UserError("--heartbeat-grace must be positive")
    if options.min_weight_std is not None:
        check_min_weight_std(options.min_weight_std, "--min-weight-std")
    if options.seeds_per_trial is not None:
        check_at_least(options, 1, "seeds_per_trial")
    check_at_least(options, 0, "confirm_top")
    check_at_least(options, 1, "confirm_seeds")
    space = load_space(options.space)
    name = options.study or space.name
    announce_outages()
    folder = StudyFolder.of(options.studies_dir, name)
    with secure_storage(options.storage or str(folder.journal)) as storage:
        return _search(options, space, name, folder, storage)


def _search(options: SearchOptions, space: SearchSpace, name: str, folder: StudyFolder, storage: str) -> SearchResult:
    folder.path.mkdir(parents=True, exist_ok=True)
    backend = open_storage(storage, options.storage_grace)
    existing = None
    if name in study_names(backend):
        found = optuna.load_study(study_name=name, storage=backend)
        if SETTINGS_ATTR in found.user_attrs or found.get_trials(deepcopy=False):
            existing = stored_settings(found)
        else:  # a creation cut short (killed, or the storage lost) before its settings were stored: made anew
            optuna.delete_study(study_name=name, storage=backend)
    settings = resolve_settings(options, existing, space, name)
    if options.confirm_top and settings.multi_objective:
        raise UserError("--confirm-top: a study of several objectives has a Pareto front, not one best to confirm")
    points = warm_start_points(space, options.enqueue, settings.sampler) if options.enqueue else []
    execution = for_training(options.execution, settings.base_config())
    executor = executor_from_options(execution, folder.slurm, job_name=name)
    if executor.multi_node and storage.startswith("sqlite"):
        raise UserError(f"storage {storage}: SQLite is not safe for {executor.name} jobs on several nodes; use "
                        "--storage postgresql://... or a journal file on a shared filesystem (the default)")
    total = options.trials
    if settings.sampler == "grid" and grid_size(space) < total:
        total = grid_size(space)
        print(f"--sampler grid: the grid has {total} points, so the study has {total} trials", file=sys.stderr)
    # once, here, before any worker needs it (after every check that may refuse the search)
    trial_base = TrainConfig.from_mapping(space.fixed, f"space {space.name}", base=settings.base_config())
    build_embedded_model(trial_base)
    zeroshot_set_for(trial_base)  # a bad zero-shot set is one line here, not a failure in every trial
    study = create_or_load(name, backend, settings)
    enqueued = enqueue_points(study, points, total, folder.ask_lock)
    record = open_study_record(options.tracking, folder.registry, name, folder.path,
                               {f"clipse.{key}": str(getattr(settings, key)) for key in ("space", *STUDY_KEYS)})
    ref = StudyRef(name=name, storage=storage, study_dir=str(folder.path),
                   session=f"{platform.node()}-{os.getpid()}-{int(time.time())}", total=total,
                   tracking=tuple(record.run_settings.items()), storage_grace_s=options.storage_grace)
    counts = count_trials(study)
    workers = f" x{options.execution.workers}" if options.execution.backend != "inline" else ""
    objective = (f"objectives {settings.metric} (Pareto front; pruning is off: Optuna cannot prune several "
                 "objectives)" if settings.multi_objective else f"objective {settings.metric} (best epoch)")
    print(f"study '{name}' ({'resumed, ' + str(counts.finished) + ' trials finished' if existing else 'new'}) "
          f"in {storage}\nspace {space.name}: {', '.join(space.params)} | {objective} | "
          f"sampler {settings.sampler} (seed {settings.seed}) | pruner {settings.pruner} | "
          + (f"min weight std {settings.min_weight_std:g} | " if settings.min_weight_std else "")
          + (f"max zero-shot drop {settings.max_zeroshot_drop:g} points | "
             if settings.max_zeroshot_drop is not None else "")
          + (f"{settings.seeds_per_trial} seeds per trial | " if settings.seeds_per_trial > 1 else "") + "executor "
          f"{options.execution.backend}{workers}" + (f" | {enqueued} trial(s) enqueued" if enqueued else "")
          + f"\nwatch it live: {dashboard_command(storage, folder)}", file=sys.stderr)
    grace = executor.heartbeat_grace_s if options.heartbeat_grace is None else options.heartbeat_grace
    workload = TrialWorkload(study, ref, execution, grace)
    confirmed = None
    try:
        with ProgressLine(name, total, lambda: count_trials(study)):
            end = run_workload(executor, workload)
        if options.confirm_top and not end.interrupted and count_trials(study).finished >= total:
            confirmed = confirm_best(study, folder, options.confirm_top, options.confirm_seeds, options.execution,
                                     record.run_settings)
            end.interrupted = confirmed is None
    except BaseException:
        record.close("FAILED")
        raise
    counts = count_trials(study)
    summary = {"pareto_front": counts.front} if settings.multi_objective else (
        {"best_value": counts.best_value} if counts.best_value is not None else {})
    record.close("FINISHED" if counts.finished >= total and not end.interrupted else "KILLED",
                 {"trials_complete": counts.complete, **summary})
    return SearchResult(study=name, storage=storage, study_dir=folder.path, counts=counts,
                        metrics=settings.metrics, total=total, top=top_trials(study), confirmed=confirmed,
                        interrupted=end.interrupted, left_running=end.detached)


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipse.search", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"spaces: {', '.join(available_spaces())}")
    add_arguments(parser, SearchOptions)
    add_config_arguments(parser.add_argument_group("training settings fixed for every trial"), only=TRAINING_KEYS)
    add_tracking_arguments(parser, "trials")
    return parser


def options_from_args(args: argparse.Namespace) -> SearchOptions:
    given = config_overrides(args)
    return from_arguments(SearchOptions, args, training={k: v for k, v in given.items() if k in TRAINING_KEYS},
                          tracking={k: v for k, v in given.items() if k in STUDY_TRACKING_KEYS})


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging()
    options = options_from_args(build_parser().parse_args(argv))
    result = run_search(options)
    counts = result.counts
    shown_values = result.metrics if len(result.metrics) > 1 else ["value"]
    heading = "Pareto front" if len(result.metrics) > 1 else "top trials"
    infeasible = f", {counts.infeasible} of them infeasible (SANW weights too uniform)" if counts.infeasible else ""
    print(f"\n{heading} of '{result.study}' ({counts.complete} complete{infeasible}, {counts.pruned} pruned, "
          f"{counts.failed} failed):")
    columns = ["trial", *shown_values, "epochs", "w_std"]
    params = list(dict.fromkeys(k for row in result.top for k in row if k not in columns))
    print(markdown_table(result.top, [*columns, *params]) if result.top else "(no completed trial)" if not counts.complete
          else "(no feasible trial: every completed trial's SANW weights spread less than the study's min weight std)")
    if len(result.metrics) > 1 and counts.front > len(result.top):
        print(f"(the first {len(result.top)} of {counts.front} trials on the front, by the mean of the objectives)")
    if result.confirmed:
        rows = [{**row, "seeds": ", ".join(map(str, row["seeds"])), "values": ", ".join(f"{v:.4f}" for v in row["values"])}
                for row in result.confirmed["trials"]]
        print(f"\nconfirmed best: trial {result.confirmed['best']} (best mean over all its seeds; clipse.final takes "
              f"it):\n" + markdown_table(rows, ["trial", "mean", "std", "single_seed_value", "seeds", "values"]))
    print(f"\nstudy folder: {result.study_dir}")
    print(f"watch it:     {result.dashboard_command}")
    if result.interrupted:
        state = f"{counts.running} left running in detached jobs" if result.left_running else "none left running"
        shown = [a.replace(options.storage, result.storage) if options.storage else a for a in argv]
        print(f"\ninterrupted: {counts.finished}/{result.total} trials finished, {state}. Resume (or watch) with:\n"
              f"  python -m clipse.search {' '.join(shlex.quote(a) for a in shown)}", file=sys.stderr)
        return 130
    if counts.complete == 0:
        print("no trial completed", file=sys.stderr)
        return 1
    return 0
