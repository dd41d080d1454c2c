"""Final evaluation of a study (SPEC §7):

    python -m clipse.final --study debias

Takes the study's best configuration(s), trains each with several seeds and the same budget,
trains the InfoNCE baseline with the same seeds and budget, evaluates every run's best
validation checkpoint on the test split, and writes to ``studies/<study>/final/``:
``runs.csv``, ``summary.csv``, ``summary.md`` (mean ± std, difference to the baseline with a
95% paired-bootstrap interval), ``dynamics.png``, ``test_metrics.png``, ``search_history.png``
and ``param_importances.png``.

The baseline is the best trial of the ``--baseline-study`` study (default ``baseline``) when it
exists and has a completed trial; otherwise InfoNCE with the non-SANW settings of the best
configuration. ``summary.md`` says which. Finished runs are reused when the command is run again;
interrupted ones resume from their last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from clipse.config import TrainConfig
from clipse.errors import UserError, cli_main, configure_logging
from clipse.executors import Task, add_executor_arguments, executor_from_args
from clipse.progress import format_duration
from clipse.spaces import SearchSpace
from clipse.study import open_storage, storage_url, stored_settings, study_names
from clipse.train import TrainResult, config_differences, train

BASELINE_LABEL = "baseline"


@dataclass
class PlannedRun:
    label: str
    seed: int
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def run_final_task(config_mapping: dict) -> dict:
    """What an executor runs: one training run (resumed if it was interrupted)."""
    result = train(TrainConfig.from_mapping(config_mapping, "final run"))
    return dataclasses.asdict(result)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipse.final", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", help="the study's storage (default: studies/<study>/journal.log)")
    parser.add_argument("--studies-dir", default="studies", type=Path)
    parser.add_argument("--top-k", type=int, default=1, help="how many of the best configurations (default 1)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per configuration (default 3)")
    parser.add_argument("--epochs", type=int, help="epoch budget of every run (default: the study's)")
    parser.add_argument("--baseline-study", default="baseline",
                        help="study whose best trial is the baseline, when it exists (default baseline)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    add_executor_arguments(parser, "run")
    return parser


def _existing_studies(studies_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in studies_dir.glob("*/journal.log"))


def open_study(name: str, studies_dir: Path, storage_arg: str | None) -> tuple[optuna.Study, str]:
    storage = storage_url(studies_dir / name, storage_arg)
    if storage_arg is None and not Path(storage).exists():
        raise UserError(f"no study '{name}' in {studies_dir}/ (studies there: "
                        f"{', '.join(_existing_studies(studies_dir)) or 'none'})")
    backend = open_storage(storage)
    names = study_names(backend)
    if name not in names:
        raise UserError(f"no study '{name}' in {storage} (available: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=backend), storage


def best_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise UserError(f"study '{study.study_name}' has no completed trial yet")
    return sorted(done, key=lambda t: t.value, reverse=True)[:k]


def trial_settings(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    """What the search chose for a trial: the space's fixed settings and the sampled ones."""
    space = SearchSpace.from_dict(stored_settings(study).space_definition)
    return {**space.fixed, **trial.params}


def choose_baseline(args, best: dict, best_label: str) -> tuple[dict, str]:
    """The best trial of the baseline study, else InfoNCE with the best config's other settings.
    Data, model and budget always come from the evaluated study, so the comparison is paired."""
    if args.baseline_study != args.study:
        try:
            study, _ = open_study(args.baseline_study, args.studies_dir.absolute(),
                                  args.storage if args.storage and "://" in args.storage else None)
            trial = best_trials(study, 1)[0]
            return trial_settings(study, trial), (f"best trial #{trial.number} of study '{args.baseline_study}' "
                                                  f"(val {trial.value:.4f}), trained here on this study's data "
                                                  "and budget")
        except UserError:
            pass
    return {**best, "loss": "infonce"}, (f"InfoNCE with the other settings of {best_label} (no completed "
                                         f"'{args.baseline_study}' study found)")


def plan_runs(args, study: optuna.Study, final_dir: Path) -> tuple[list[PlannedRun], str]:
    settings = stored_settings(study)
    epochs = args.epochs or int(settings.base.get("epochs", TrainConfig().epochs))
    chosen = [(f"trial-{t.number}", trial_settings(study, t), t) for t in best_trials(study, args.top_k)]
    baseline, baseline_text = choose_baseline(args, chosen[0][1], chosen[0][0])
    registry = args.studies_dir.absolute() / "run_registry.csv"
    runs = []
    for label, chosen_settings in [(label, c) for label, c, _ in chosen] + [(BASELINE_LABEL, baseline)]:
        config = TrainConfig.from_mapping({**settings.base, **chosen_settings}, f"{label} settings")
        for seed in range(args.seeds):
            runs.append(PlannedRun(label, seed, config.replace(
                epochs=epochs, seed=seed, eval_test=True, resume=True, progress=False, study=f"{study.study_name}/final",
                trial=None, select_metric=settings.metric, registry=str(registry),
                run_dir=str(final_dir / "runs" / f"{label}-seed{seed}")).validate()))
    lines = [f"# Final evaluation of study '{study.study_name}'", "",
             "- configurations: " + "; ".join(f"`{label}` ({settings.metric} {t.value:.4f}, loss {c['loss']})"
                                              for label, c, t in chosen),
             f"- baseline: {baseline_text}",
             f"- seeds {', '.join(str(s) for s in range(args.seeds))}; {epochs} epochs per run; each run's best "
             f"validation epoch ({settings.metric}) is evaluated on the test split"]
    return runs, "\n".join(lines)


def finished(run: PlannedRun) -> bool:
    """A run that completed with test results and exactly this configuration."""
    result_file = run.run_dir / "result.json"
    if not result_file.exists():
        return False
    changed = config_differences(run.config, run.run_dir)
    if changed:
        raise UserError(f"{run.run_dir} was trained with other settings ({'; '.join(changed)}); delete it or "
                        "keep the earlier settings")
    result = TrainResult.load(result_file)
    return result.status == "completed" and bool(result.test_metrics)


def execute(runs: list[PlannedRun], executor, label: str) -> None:
    todo = [r for r in runs if not finished(r)]
    print(f"[{label}] {len(runs) - len(todo)} of {len(runs)} runs already finished; training {len(todo)}",
          file=sys.stderr)
    if not todo:
        return
    started = time.time()
    queue = list(todo)
    tasks: list[Task] = []
    reported = set()
    try:
        while True:
            # executors take at most `capacity` unfinished tasks; the rest wait here (the inline
            # executor trains each run as it is submitted, so each is reported as it ends)
            room = min(len(queue), executor.capacity - sum(not t.finished for t in tasks))
            if room > 0:
                batch, queue = queue[:room], queue[room:]
                tasks += executor.submit(run_final_task, [(r.config.to_mapping(),) for r in batch],
                                         [f"{r.label}-seed{r.seed}" for r in batch])
            for task in tasks:
                if task.finished and id(task) not in reported:
                    reported.add(id(task))
                    done = len(reported)
                    eta = (time.time() - started) / done * (len(todo) - done)
                    status = task.result["status"] if task.state == "done" else f"{task.state}: {task.error}"
                    print(f"[{label}] {done}/{len(todo)} runs done ({task.label}: {status}) | "
                          f"{format_duration(time.time() - started)} elapsed | ETA {format_duration(eta)}",
                          file=sys.stderr)
            outstanding = [t for t in tasks if not t.finished]
            if not outstanding and not queue:
                break
            if outstanding:
                executor.wait(outstanding, 2.0)
        executor.close()
    except BaseException:
        executor.cancel([t for t in tasks if not t.finished])
        raise
    problems = [f"{t.label} ({t.state}: {t.error or (t.result or {}).get('status')})" for t in tasks
                if t.state != "done" or t.result["status"] != "completed"]
    if problems:
        raise UserError(f"some runs did not complete: {', '.join(problems)}; their folders are under "
                        f"{runs[0].run_dir.parent}; re-run the same command to retry them")


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.top_k < 1 or args.seeds < 1:
        raise UserError("--top-k and --seeds must be at least 1")
    study, _ = open_study(args.study, args.studies_dir, args.storage)
    final_dir = (args.studies_dir / args.study / "final").absolute()
    runs, intro = plan_runs(args, study, final_dir)
    executor = executor_from_args(args, final_dir / "slurm", job_name=f"{args.study}-final")
    try:
        execute(runs, executor, f"final {args.study}")
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are kept. Continue with:\n  python -m clipse.final "
              f"{' '.join(shlex.quote(a) for a in argv)}", file=sys.stderr)
        return 130

    from analysis.dynamics import plot_runs
    from analysis.search_plots import plot_history, plot_importances
    from analysis.summary import RunRecord, write_report

    records = [RunRecord(r.run_dir, r.label, r.seed) for r in runs]
    paths = write_report(records, BASELINE_LABEL, final_dir, intro, args.resamples)
    paths["dynamics"] = plot_runs([(r.run_dir, r.label) for r in runs], final_dir / "dynamics.png",
                                  title=f"final runs of '{args.study}'")
    paths["search_history"] = plot_history(study, final_dir / "search_history.png")
    paths["param_importances"] = plot_importances(study, final_dir / "param_importances.png")
    print(paths["summary_md"].read_text())
    print("files:\n" + "\n".join(f"  {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
