"""Hyperparameter search (SPEC §6):

    python -m clipse.search --space bandpass --trials 50

``--trials N`` is the study's total: running the same command again after a crash or Ctrl-C
finishes the remaining trials and repeats no finished one. The study's settings (space,
metric, sampler, seed, pruner, training settings given here) are stored with it when it is
created and reused on resume; giving a different value for one of them is an error.

The coordinator (this process) hands one task per trial to an executor and watches the
storage: it shows progress, sweeps trials whose worker died (failing them and queueing a retry
with the same parameters that resumes from the dead trial's checkpoint) and replaces lost work.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import optuna
from optuna.trial import TrialState

from clipse.config import SELECT_METRICS, add_config_arguments, config_overrides, TrainConfig
from clipse.errors import UserError, cli_main, configure_logging
from clipse.executors import Executor, Task, add_executor_arguments, executor_from_args
from clipse.objective import StudyRef, TrialOutcome, run_trial_task
from clipse.progress import ProgressLine
from clipse.spaces import available_spaces, load_space
from clipse.study import (DEFAULT_GRACE_S, PRUNERS, SLURM_GRACE_S, SAMPLERS, StudySettings, count_trials, create_or_load,
                          open_storage, stored_settings, storage_url, study_names, sweep_lost_trials)
from clipse.tables import markdown_table

# Training settings a search may fix for all its trials (the space chooses the rest).
BASE_FLAGS = ["epochs", "data", "data_root", "image_root", "data_seed", "shapes_train_images", "shapes_val_images",
              "shapes_test_images", "model", "pretrained", "lock_image", "lock_text", "batch_size", "device"]
STUDY_FLAGS = {"metric": "val_r1_mean", "sampler": "tpe", "startup_trials": 10, "pruner": "median"}
POLL_S = 2.0
MAX_TASK_ERRORS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipse.search", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"spaces: {', '.join(available_spaces())}")
    parser.add_argument("--space", required=True, help="search space name (search_spaces/NAME.yaml) or a YAML path")
    parser.add_argument("--trials", required=True, type=int, help="total trials of the study (finished ones count)")
    parser.add_argument("--study", help="study name (default: the space's name)")
    parser.add_argument("--storage", help="Optuna RDB URL, or a journal file path (default: "
                        "studies/<study>/journal.log)")
    parser.add_argument("--studies-dir", default="studies", type=Path, help="where study folders live")
    add_executor_arguments(parser, "trial")
    parser.add_argument("--seed", type=int, help="seed of the sampler and of every trial's training (default 0)")
    parser.add_argument("--metric", choices=SELECT_METRICS, help="objective (default val_r1_mean)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="tpe (default; multivariate, constant liar) or random")
    parser.add_argument("--startup-trials", type=int, help="random trials before TPE models the space (default 10)")
    parser.add_argument("--pruner", choices=PRUNERS, help="stops poor trials early from their per-epoch curve "
                        "(default median)")
    parser.add_argument("--heartbeat-grace", type=float,
                        help=f"seconds without a heartbeat before a running trial counts as lost (default "
                             f"{DEFAULT_GRACE_S:.0f}; {SLURM_GRACE_S:.0f} with SLURM, whose requeued jobs wait "
                             "minutes to restart; jobs that ended are noticed from sacct at once)")
    parser.add_argument("--max-retries", type=int, default=2, help="retries of a trial whose worker died")
    add_config_arguments(parser.add_argument_group("training settings fixed for every trial"), only=BASE_FLAGS)
    return parser


def resolve_settings(args: argparse.Namespace, existing: StudySettings | None, space) -> StudySettings:
    """The new study's settings, or the existing study's after checking the flags agree."""
    given = {key: getattr(args, key) for key in ("metric", "sampler", "startup_trials", "pruner", "seed")
             if getattr(args, key) is not None}
    base = config_overrides(args)
    TrainConfig.from_mapping(base, "command line").validate()  # fail before anything is created
    if existing is None:
        seed = given.pop("seed", 0)
        settings = StudySettings(space=space.name, space_digest=space.digest, space_definition=space.to_dict(),
                                 seed=seed, base={**base, "seed": seed}, **{**STUDY_FLAGS, **given})
        return settings
    stored = asdict(existing)
    conflicts = [f"--{k.replace('_', '-')} {v} (study has {stored[k]})" for k, v in given.items() if stored[k] != v]
    conflicts += [f"--{k.replace('_', '-')} {v} (study has {existing.base.get(k, 'the default')})"
                  for k, v in base.items() if existing.base.get(k) != v]
    if existing.space != space.name:
        conflicts.append(f"--space {space.name} (study has {existing.space})")
    elif existing.space_digest != space.digest:
        raise UserError(f"search space {space.path} changed since the study was created; use a new --study")
    if conflicts:
        raise UserError(f"study '{args.study or space.name}' was created with other settings: {'; '.join(conflicts)}; "
                        "drop those flags or use a new --study")
    return existing


def top_trials_table(study: optuna.Study, limit: int = 10) -> str:
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
                  key=lambda t: t.value, reverse=True)[:limit]
    if not done:
        return "(no completed trial)"
    params = list(dict.fromkeys(k for t in done for k in t.params))
    rows = [{"trial": t.number, "value": t.value, "epochs": t.user_attrs.get("epochs_done"),
             "w_std": t.user_attrs.get("weights_weight_std"), **t.params} for t in done]
    return markdown_table(rows, ["trial", "value", "epochs", "w_std", *params])


def coordinate(study: optuna.Study, ref: StudyRef, executor: Executor, total: int, args, tasks: list[Task]) -> None:
    """Keep exactly enough tasks out to reach ``total`` trials; replace lost work. ``tasks``
    collects every task handed out (the caller cancels the unfinished ones on Ctrl-C)."""
    consecutive_errors = 0
    allowed_errors = max(MAX_TASK_ERRORS, 2 * args.workers)
    unchecked: list[Task] = []  # handed out, result not looked at yet
    while True:
        sweep_lost_trials(study, grace_s=args.heartbeat_grace, dead_jobs=executor.dead_jobs(),
                          max_retries=args.max_retries, session=ref.session)
        counts = count_trials(study, ref.session)
        outstanding = [t for t in tasks if not t.finished]
        need = total - counts.finished - counts.running_elsewhere - len(outstanding)
        if counts.finished >= total and not outstanding and not unchecked:
            return
        room = min(need, executor.capacity - len(outstanding))
        if room > 0:
            submitted = executor.submit(run_trial_task, [(ref, args.max_retries)] * room)
            tasks += submitted
            unchecked += submitted
            outstanding = [t for t in tasks if not t.finished]
        if outstanding:
            executor.wait(outstanding, POLL_S)
        elif need <= 0 and not unchecked:
            time.sleep(POLL_S)  # only trials of another session are running: watch them
        for task in [t for t in unchecked if t.finished]:
            unchecked.remove(task)
            if task.user_error:
                raise UserError(task.error)
            if isinstance(task.result, TrialOutcome):
                consecutive_errors = 0
                continue
            consecutive_errors += 1  # lost work counts too: a job that cannot even report is a problem
            print(f"\nworker {task.state}: {task.error}", file=sys.stderr)
            if consecutive_errors >= allowed_errors:
                raise UserError(f"workers cannot run trials ({consecutive_errors} failures in a row): {task.error}")


def shutdown_after_interrupt(study: optuna.Study, ref: StudyRef, executor: Executor, tasks: list[Task]) -> bool:
    """Stop this session's work and leave none of its trials RUNNING (they are failed and
    queued again, so the next run resumes them from their checkpoints). Returns False when the
    work was detached: its jobs run on and keep their trials alive with heartbeats."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleaning up on a second Ctrl-C
    try:
        stopped = executor.cancel([t for t in tasks if not t.finished])
        if stopped:
            sweep_lost_trials(study, session=ref.session, everything_of_session=True)
        return stopped
    finally:
        signal.signal(signal.SIGINT, previous)


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.trials < 1:
        raise UserError("--trials must be at least 1")
    space = load_space(args.space)
    name = args.study or space.name
    study_dir = (args.studies_dir / name).absolute()  # absolute: SLURM jobs may start elsewhere
    storage = storage_url(study_dir, args.storage)
    study_dir.mkdir(parents=True, exist_ok=True)
    backend = open_storage(storage)
    existing = None
    if name in study_names(backend):
        existing = stored_settings(optuna.load_study(study_name=name, storage=backend))
    settings = resolve_settings(args, existing, space)
    if (args.executor == "slurm") and storage.startswith("sqlite"):
        raise UserError(f"storage {storage}: SQLite is not safe for SLURM jobs on several nodes; use "
                        "--storage postgresql://... or a journal file on a shared filesystem (the default)")
    executor = executor_from_args(args, study_dir / "slurm", job_name=name)
    if args.heartbeat_grace is None:
        args.heartbeat_grace = SLURM_GRACE_S if executor.name == "slurm" else DEFAULT_GRACE_S
    study = create_or_load(name, backend, settings, int(settings.base.get("epochs", TrainConfig().epochs)))
    session = f"{platform.node()}-{os.getpid()}-{int(time.time())}"
    ref = StudyRef(name=name, storage=storage, study_dir=str(study_dir), session=session, total=args.trials)
    counts = count_trials(study)
    print(f"study '{name}' ({'resumed, ' + str(counts.finished) + ' trials finished' if existing else 'new'}) "
          f"in {storage}\nspace {space.name}: {', '.join(space.params)} | objective {settings.metric} (best epoch) | "
          f"sampler {settings.sampler} (seed {settings.seed}) | pruner {settings.pruner} | executor {executor.name}"
          + (f" x{args.workers}" if executor.name != "inline" else ""), file=sys.stderr)
    interrupted, stopped, tasks = False, True, []
    with ProgressLine(name, args.trials, lambda: count_trials(study)):
        try:
            coordinate(study, ref, executor, args.trials, args, tasks)
        except KeyboardInterrupt:
            interrupted = True
            stopped = shutdown_after_interrupt(study, ref, executor, tasks)
        except BaseException:
            shutdown_after_interrupt(study, ref, executor, tasks)  # leave no job or trial behind
            raise
        finally:
            if not interrupted:
                executor.close()
    counts = count_trials(study)
    print(f"\ntop trials of '{name}' ({counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed):")
    print(top_trials_table(study))
    print(f"\nstudy folder: {study_dir}")
    print(f"watch it:     optuna-dashboard {shlex.quote(storage)} --artifact-dir {shlex.quote(str(study_dir / 'artifacts'))}")
    if interrupted:
        state = "none left running" if stopped else f"{counts.running} left running in detached jobs"
        print(f"\ninterrupted: {counts.finished}/{args.trials} trials finished, {state}. Resume (or watch) with:\n"
              f"  python -m clipse.search {' '.join(shlex.quote(a) for a in argv)}", file=sys.stderr)
        return 130
    if counts.complete == 0:
        print("no trial completed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
